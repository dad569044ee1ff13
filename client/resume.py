"""Training checkpoints for crash/Ctrl-C recovery: trainable tensors, optimizer moments, RNG, step.

Written to `<out>.work/checkpoint.safetensors` (temp file + rename) with the step, the run's identity
and the losses in its metadata, so the one rename makes a checkpoint whole; `checkpoint.json` repeats
that record for people and tools. A rerun of the same command continues exactly where the last
checkpoint left off, even after the process was killed at any moment.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from shared.atomic import write_bytes_atomic
from shared.errors import UserError
from shared.validate import parse_json, read_json

TENSORS, RECORD = "checkpoint.safetensors", "checkpoint.json"


def save_checkpoint(work: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, identity: dict, losses: list[float]) -> None:
    """Everything needed to continue training at `step`."""
    index = {id(p): name for name, p in params.items()}
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{index[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng"] = generator.get_state()
    record = json.dumps({"step": step, "identity": identity, "losses": losses})
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={"checkpoint": record})
    tmp.replace(work / TENSORS)
    write_bytes_atomic(work / RECORD, record.encode())


def _record(work: Path) -> dict | None:
    """The checkpoint's record {step, identity, losses}, or None when `work` holds no checkpoint."""
    tensors_path, record_path = work / TENSORS, work / RECORD
    if not tensors_path.is_file():
        return None
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            text = (f.metadata() or {}).get("checkpoint")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {tensors_path} is damaged ({exc}); delete {work} to start over") from exc
    record = parse_json(text, f"checkpoint {tensors_path}") if text else read_json(record_path, "checkpoint record")
    if not isinstance(record, dict) or not {"step", "identity", "losses"} <= set(record):
        raise UserError(f"checkpoint {tensors_path} lacks its step/identity/losses; delete {work} to start over")
    return record


def checkpoint_identity(work: Path) -> dict | None:
    """The identity of the run whose checkpoint `work` holds (None if none)."""
    record = _record(work)
    return None if record is None else record["identity"]


def load_checkpoint(work: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, identity: dict) -> tuple[int, list[float]]:
    """Restore a checkpoint into `params`/`optimizer`/`generator`; return (step, losses). (0, []) if none."""
    record = _record(work)
    if record is None:
        return 0, []
    if record["identity"] != identity:
        stored = record["identity"] if isinstance(record["identity"], dict) else {}
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        raise UserError(f"{work} holds a checkpoint of a different run (differs in: {', '.join(changed)}); "
                        "delete it to start over, or rerun with the same settings to resume")
    tensors = load_file(str(work / TENSORS))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            prefix = f"optim.{name}."
            state = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith(prefix) and "." not in k[len(prefix):]}
            if state:
                state["step"] = state["step"].cpu()
                optimizer.state[p] = state
    generator.set_state(tensors["rng"])
    return int(record["step"]), list(record["losses"])
