"""The RetNet as integer hardware runs it: `spec` (its fixed numbers), `reference` (the
recurrent step in numpy int64, which imports no torch and nothing from the simulation),
`simulation` (the same graph on a float model's parameters with straight-through
gradients, for QAT), `export` (from the simulation to the reference) and `c_export` (the
reference as a C99 program)."""
