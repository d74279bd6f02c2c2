"""Write a copy of a GGUF file with its projections requantized as a mixed file: one type for most,
a finer one for the value and down projections of the layers llama.cpp's Q4_K_M gives more bits
(the first and last eighth of the layers and every third between). For measuring how mixed files
load when no such file is at hand (the default model ships as Q4_1 alone); the gguf library
quantizes Q4_0 / Q4_1 / Q8_0 (not the K types), so the default mix is Q4_0 with Q8_0.

    python -m offload.profiles.mixed_gguf --out runs/smollm2-q4_0-q8_0.gguf
    python -m offload.profiles.quant_accuracy --model runs/smollm2-q4_0-q8_0.gguf --formats "int4 weights" "file's form"
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

FINER_TENSORS = ("attn_v.weight", "ffn_down.weight")  # where llama.cpp's Q4_K_M spends its extra bits


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the layers whose value and down projections Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def target_type(name: str, layers: int, base: str, finer: str) -> str | None:
    """The type a tensor is rewritten in (None: copied as it is: norms, embeddings, head)."""
    parts = name.split(".")
    if parts[0] != "blk" or not name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                               "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                                               "ffn_down.weight")):
        return None
    return finer if name.endswith(FINER_TENSORS) and more_bits(int(parts[1]), layers) else base


def write_mixed(source: Path, out: Path, base: str = "Q4_0", finer: str = "Q8_0") -> dict[str, int]:
    """Write ``source`` to ``out`` (atomically) with its projections requantized; returns how many
    tensors went to each type."""
    import gguf

    from offload.tiers.store import pid_alive

    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a killed run's half-written copy
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    layers = int(reader.fields[f"{arch}.block_count"].contents())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    counts: dict[str, int] = {}
    for t in tqdm(reader.tensors, desc="requantizing", unit="tensor"):
        new = target_type(t.name, layers, base, finer)
        if new is None or new == t.tensor_type.name:
            data, raw_type = t.data, t.tensor_type
        else:
            dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [rows, cols]
            raw_type = gguf.GGMLQuantizationType[new]
            data = gguf.quants.quantize(dense, raw_type)
        counts[raw_type.name] = counts.get(raw_type.name, 0) + 1
        if raw_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.ascontiguousarray(data).reshape(tuple(reversed(t.shape.tolist()))))
        else:
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=raw_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def main(argv=None) -> int:
    from offload.loaders import resolve_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the GGUF file to copy (default: the default model)")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default="Q4_0", help="type of most projections")
    p.add_argument("--finer", default="Q8_0", help="type of the value and down projections of the more-bits layers")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = write_mixed(resolve_model_path(args.model), out, args.base, args.finer)
    print(json.dumps({"out": str(out), "tensors": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
