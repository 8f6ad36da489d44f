"""Compile an exported header with the system compiler (UBSan trapping) and read back its output
for every input code of every scale, a few codes past each end of the Q-bit range."""
import shutil
import subprocess

import numpy as np

from gqa_lut.export_c import export_c
from gqa_lut.quantization import int_range

CC = shutil.which("cc") or shutil.which("gcc")
MARGIN = 3  # codes outside the Q-bit range on each side: the header clamps them


def c_codes(table) -> np.ndarray:
    qmin, qmax = int_range(table.input_bits)
    return np.arange(qmin - MARGIN, qmax + MARGIN + 1, dtype=np.int64)


def c_outputs(table, folder) -> dict[int, np.ndarray]:
    (folder / "t.h").write_text(export_c(table, "t"))
    codes = c_codes(table)
    calls = "\n".join(
        f'  for (long x = {codes[0]}; x <= {codes[-1]}; x++) '
        f'printf("%lld\\n", (long long)t_d{d if d >= 0 else f"m{-d}"}((int32_t)x));'
        for d in table.scales)
    (folder / "main.c").write_text(f'#include <stdio.h>\n#include "t.h"\nint main(void) {{\n{calls}\n  return 0;\n}}\n')
    exe = folder / "main"
    subprocess.run([CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsanitize=undefined",
                    "-fno-sanitize-recover=all", "-o", str(exe), str(folder / "main.c")],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[:500]  # UBSan aborts on the first overflow
    vals = np.array(run.stdout.split(), dtype=np.int64)
    n = codes.size
    return {d: vals[i * n:(i + 1) * n] for i, d in enumerate(table.scales)}
