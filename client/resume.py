"""Training checkpoints for crash/Ctrl-C recovery: trainable tensors, optimizer moments, RNG, step.

Written to `<out>.work/checkpoint.safetensors` + `checkpoint.json` (temp file + rename), so a
rerun of the same command continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.atomic import write_bytes_atomic
from shared.errors import UserError


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
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / ".checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(work / "checkpoint.safetensors")
    write_bytes_atomic(work / "checkpoint.json", json.dumps({"step": step, "identity": identity,
                                                              "losses": losses}).encode())


def load_checkpoint(work: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, identity: dict) -> tuple[int, list[float]]:
    """Restore a checkpoint into `params`/`optimizer`/`generator`; return (step, losses). (0, []) if none."""
    meta_path = work / "checkpoint.json"
    if not meta_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text())
    if meta["identity"] != identity:
        changed = sorted(k for k in identity if meta["identity"].get(k) != identity[k])
        raise UserError(f"{work} holds a checkpoint of a different run (differs in: {', '.join(changed)}); "
                        "delete it to start over, or rerun with the same settings to resume")
    tensors = load_file(str(work / "checkpoint.safetensors"))
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
    return meta["step"], meta["losses"]
