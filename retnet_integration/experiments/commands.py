"""`gqa-lut retnet qat-int | export-c | check-int`: train the integer graph, write it as C, and
check float, fake-quant, the integer reference and the C program against each other.

An integer checkpoint is a RetNet checkpoint plus `int_exps` (every activation's power-of-two
exponent) and `float_state_dict` (the weights before QAT, for `bpc_float`). A float checkpoint
works everywhere too: it is calibrated on the spot, without QAT.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Optional
from pathlib import Path

import numpy as np
import torch

from gqa_lut.errors import UsageError
from gqa_lut.progress import ProgressBar
from gqa_lut.io import parse_json, read_text_capped, write_atomic, write_json_atomic
from retnet_integration.integer import reference as ref
from retnet_integration.integer.export import export_integer
from retnet_integration.data import eval_windows, load_corpus
from retnet_integration.integer.simulation import IntSim
from retnet_integration.model import RetNet
from retnet_integration.experiments.pipeline import (
    bits_per_char,
    calib_batches,
    checkpoint_config,
    load_checkpoint,
    pick_device,
    read_checkpoint,
    train_steps,
)

CHECK_KEYS = ("positions", "bpc_float", "bpc_fakequant", "bpc_int", "int_vs_fakequant_argmax_agree",
              "c_vs_int_logits_equal", "c_tokens_per_s", "int_tokens_per_s", "weights_bytes", "state_bytes",
              "forms_vs_int_argmax_agree", "arm_vs_int_logits_equal", "cortex_m4")
CHUNK = 16  # the chunkwise form's chunk in check-int


def load_sim(checkpoint: Path, device: torch.device) -> tuple[IntSim, RetNet, dict]:
    """(the integer graph's simulation, the float model before QAT, the checkpoint's extra)."""
    net, ck = read_checkpoint(checkpoint, device)
    extra = ck.get("extra", {})
    base = copy.deepcopy(net)
    if "float_state_dict" in ck:
        base.load_state_dict(ck["float_state_dict"])
    try:
        sim = IntSim(net, ck.get("int_exps"))
    except ValueError as exc:
        raise UsageError(f"checkpoint {str(checkpoint)!r} cannot run on integers: {exc}") from None
    if not sim.exps:
        tcfg = checkpoint_config(extra)
        sim.calibrate(calib_batches(load_corpus(tcfg.corpus), tcfg, device))
    return sim.eval(), base.eval(), extra


def run_qat(checkpoint: Path, out: Path, device_name: str = "auto", steps: int | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Calibrate the integer graph on the float checkpoint, then fine-tune through it (the
    parallel form, straight-through gradients) and save an integer checkpoint."""
    device = pick_device(device_name)
    net, extra = load_checkpoint(checkpoint, device)
    tcfg = checkpoint_config(extra)
    steps = tcfg.qat_steps if steps is None else steps
    if steps < 0:
        raise UsageError(f"steps {steps} is not allowed: use 0 or more")
    corpus = load_corpus(tcfg.corpus)
    base_state = copy.deepcopy(net.state_dict())
    try:
        sim = IntSim(net)
    except ValueError as exc:
        raise UsageError(f"checkpoint {str(checkpoint)!r} cannot run on integers: {exc}") from None
    exps = sim.calibrate(calib_batches(corpus, tcfg, device))
    t0 = time.perf_counter()
    losses = train_steps(sim, corpus.train, tcfg, steps, tcfg.qat_lr, device, tcfg.seed + 5, log) if steps else []
    seconds = time.perf_counter() - t0
    info = dict(extra, int_qat={"steps": steps, "lr": tcfg.qat_lr, "seconds": seconds, "from": str(checkpoint),
                                "first_last_loss": [losses[0], losses[-1]] if losses else None})
    doc = {"config": net.cfg.to_dict(), "state_dict": net.state_dict(), "extra": info, "int_exps": exps,
           "float_state_dict": base_state}
    write_atomic(out, lambda tmp: torch.save(doc, tmp))
    log(f"integer QAT: {steps} steps in {seconds:.1f}s -> {out}")
    return info


def run_export(checkpoint: Path, out: Path, log: Callable[[str], None] = print) -> list[Path]:
    from retnet_integration.integer import c_export

    sim, _, _ = load_sim(checkpoint, torch.device("cpu"))
    m = export_integer(sim)
    files = c_export.write_program(m, out)
    write_json_atomic(out / "model.json", {"config": sim.net.cfg.to_dict(), "checkpoint": str(checkpoint),
                                           "exps": m.exps, "logit_frac": m.logit_frac,
                                           "weights_bytes": m.weights_bytes(), "state_bytes": m.state_bytes()})
    log(f"wrote {', '.join(p.name for p in files)} and model.json to {out}; weights {m.weights_bytes()} bytes, "
        f"state {m.state_bytes()} bytes")
    return files


def _bpc(logits: np.ndarray, targets: np.ndarray) -> float:
    """Bits per character of real-valued logits (float64 here: the metric, not the model)."""
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    picked = np.take_along_axis(z, targets[..., None], -1)[..., 0]
    return float((lse - picked).mean() / math.log(2))


def _run_c(folder: Path, windows: np.ndarray, vocab: int, bar: Optional[ProgressBar] = None, arm: bool = False
           ) -> tuple[np.ndarray, float]:
    """Build the example program on the library (natively, or for 32-bit ARM Linux to run under
    qemu-arm) and run it on every window: its logits and the seconds its steps took."""
    from retnet_integration.integer import c_export

    meta = folder / "model.json"
    if not all((folder / f).is_file() for f in c_export.SOURCES) or not meta.is_file():
        raise UsageError(f"--c {str(folder)!r} holds no exported library: write one with `gqa-lut retnet export-c`")
    cmd = c_export.arm_linux_build(folder) if arm else [str(c_export.build(folder))]
    label = "C on ARM (qemu)" if arm else "C library"
    return c_export.run_logits(cmd, windows, vocab, None if bar is None else lambda: bar.step(label))


def run_check(checkpoint: Path, c_dir: Path | None = None, windows: int | None = None,
              log: Callable[[str], None] = print, arm: bool = False) -> dict:
    if windows is not None and windows < 1:
        raise UsageError(f"--windows {windows} is not allowed: use 1 or more")
    if arm and c_dir is None:
        raise UsageError("--arm needs --c: the folder of the exported library to build for ARM")
    device = torch.device("cpu")
    sim, base, extra = load_sim(checkpoint, device)
    m = export_integer(sim)
    if c_dir is not None:
        meta_path = Path(c_dir) / "model.json"
        if meta_path.is_file():
            meta = parse_json(read_text_capped(meta_path, "--c model.json", 1 << 20), f"--c {str(meta_path)!r}")
            if not isinstance(meta, dict) or meta.get("config", {}) != sim.net.cfg.to_dict():
                raise UsageError(f"--c {str(c_dir)!r} was exported for a model of another shape "
                                 f"({meta.get('config') if isinstance(meta, dict) else meta!r}) than "
                                 f"{str(checkpoint)!r}: export it again")
    tcfg = checkpoint_config(extra)
    test = eval_windows(load_corpus(tcfg.corpus).test, tcfg.seq_len, windows or tcfg.eval_windows)
    x, y = test[:, :-1], test[:, 1:].numpy()
    bpc_float = bits_per_char(base, test, device)
    batches = range(0, x.shape[0], 64)
    names = ("recurrent", f"chunkwise{CHUNK}", "parallel")
    c_runs = (0 if c_dir is None else 1) + (1 if arm else 0)
    bar = ProgressBar("check-int", total=len(batches) * (len(names) + 1) + x.shape[0] * c_runs)

    def counted(value):
        bar.step()
        return value

    with torch.no_grad():  # every form of the simulation: recurrent (the graph), chunkwise, parallel
        forms = {form: torch.cat([counted(sim(x[i:i + 64], form)[0]) for i in batches]).double().numpy()
                 for form in names}
    fake, par = forms["recurrent"], forms["parallel"]
    ints = np.concatenate([counted(ref.run(m, x[i:i + 64].numpy())) for i in batches])
    best = ints.argmax(-1)
    agree = {form: float((best == logits.argmax(-1)).mean()) for form, logits in forms.items()}
    t0 = time.perf_counter()
    ref.run(m, x[:1].numpy())  # one stream, one token at a time: what the C program does
    int_tps = x.shape[1] / (time.perf_counter() - t0)
    scale = 2.0 ** -m.logit_frac
    doc = {"positions": int(x.numel()), "bpc_float": bpc_float, "bpc_fakequant": _bpc(fake, y),
           "bpc_int": _bpc(ints * scale, y),
           "int_vs_fakequant_argmax_agree": agree["recurrent"],
           "c_vs_int_logits_equal": None, "c_tokens_per_s": None, "int_tokens_per_s": int_tps,
           "weights_bytes": m.weights_bytes(), "state_bytes": m.state_bytes(),
           "forms_vs_int_argmax_agree": agree, "arm_vs_int_logits_equal": None, "cortex_m4": None}
    if c_dir is not None:
        c_logits, seconds = _run_c(Path(c_dir), x.numpy(), m.vocab, bar)
        if c_logits.shape != ints.shape:
            raise UsageError(f"--c {str(c_dir)!r} printed logits of shape {c_logits.shape}, expected {ints.shape}: "
                             "was it exported from this checkpoint?")
        doc["c_vs_int_logits_equal"] = float((c_logits == ints).all(-1).mean())
        doc["c_tokens_per_s"] = x.numel() / max(seconds, 1e-9)
    if arm:
        from retnet_integration.integer import c_export
        arm_logits, _ = _run_c(Path(c_dir), x.numpy(), m.vocab, bar, arm=True)
        doc["arm_vs_int_logits_equal"] = float((arm_logits == ints).all(-1).mean())
        doc["cortex_m4"] = c_export.cortex_m_sizes(Path(c_dir))
    bar.close()
    log(f"{doc['positions']} positions: bpc float {doc['bpc_float']:.4f}, fake-quant {doc['bpc_fakequant']:.4f} "
        f"(parallel form {_bpc(par, y):.4f}), integer {doc['bpc_int']:.4f} "
        f"({100 * (doc['bpc_int'] / doc['bpc_float'] - 1):+.2f}% vs float)")
    log(f"argmax agreement integer vs fake-quant {100 * agree['recurrent']:.3f}% "
        f"(chunkwise form, {CHUNK}-token chunks, vs integer {100 * agree[f'chunkwise{CHUNK}']:.3f}%; "
        f"parallel form vs integer {100 * agree['parallel']:.3f}%)")
    if c_dir is not None:
        log(f"C logits equal to the integer reference's at {100 * doc['c_vs_int_logits_equal']:.3f}% of positions; "
            f"C {doc['c_tokens_per_s']:.0f} tokens/s, reference {int_tps:.0f} tokens/s (one stream, this machine)")
    if arm:
        img = doc["cortex_m4"]["image"]
        log(f"32-bit ARM (qemu-arm): logits equal to the reference's at {100 * doc['arm_vs_int_logits_equal']:.3f}% "
            f"of positions; Cortex-M4 image: flash {img['flash']} bytes, RAM {img['ram']} bytes")
    log(f"weights + tables {doc['weights_bytes']} bytes, state {doc['state_bytes']} bytes")
    return doc
