"""A quantized RetNet with the LUT ops plugged in, evaluated end to end (see the open issue)."""
