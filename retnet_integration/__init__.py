"""A quantized RetNet with the LUT ops plugged in, trained and evaluated end to end on fortunes."""
