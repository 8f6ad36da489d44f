"""What the RetNet proves end to end: the train/eval/report pipeline, the quantization study,
and the integer commands (QAT of the integer graph, the C export, the four-way check)."""
