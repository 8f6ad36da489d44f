"""Putting tables into a model: `replace_ops` (module swaps, Hugging Face adapters, call sites
of functional calls), `calibrate`, the report of what runs through tables and what stayed
float, and the ONNX export. Built on ops.nn; nothing below imports it."""
