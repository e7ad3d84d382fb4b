"""Static INT8 programs with ONNX Runtime's quantizer (``onnxruntime.quantization.quantize_static``):
QDQ format, per-channel weights, MinMax ranges from calibration images.

Every program pteenet quantizes (the stage programs of ``export --format staged-onnx --quantize int8``
and of the INT8 sweep, and the whole plain backbones ``benchmarks/cifar10_int8.py`` compares with)
goes through ``quantize_program``, with the ranges of its inputs taken from the FP32 values the
program sees in the model (the FP32 model run in eager PyTorch up to it). The ranges of a tensor then
depend only on the FP32 model and the calibration images, never on where the model is cut into
programs: a stage quantized alone computes what it computes inside a piece, so the sweep's cache on
per-stage programs is the cache of the program that ships, whatever exits it selects.

The exits' heads, and so their decisions (softmax, entropy, sigmoid, the comparison with the
threshold), stay in FP32 on the dequantized taps (``QuantizedParts``); ``leave`` stays bool.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PteenetError, describe_error
from .model import EarlyExitModel

PRECISIONS = ("fp32", "int8")
DEFAULT_QUANT_IMAGES = 512  # calibration images per program
QUANT_BATCH = 64  # images per calibration batch (the ranges are min/max over all of them)
# Activations uint8, weights int8 (U8S8): the form x86's VNNI instructions multiply; with int8
# activations (S8S8) ONNX Runtime ran ResNet-56 slower than FP32 on a VNNI CPU (benchmarks/cifar10_int8.py
# times both: resnet56_int8 and resnet56_int8_s8s8).
SETTINGS = {"format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8", "ranges": "min-max",
            "tool": "onnxruntime.quantization.quantize_static"}


def cpu_int8_instructions(cpuinfo: str | None = None) -> str:
    """The CPU's INT8 dot-product instructions, from /proc/cpuinfo's flags: 'AMX', 'VNNI' (AVX-512
    or AVX), or 'none' (INT8 may then be slower than FP32); 'unknown' off Linux."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(line for line in cpuinfo.splitlines() if line.startswith("flags"))))
    found = [name for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
             if flag in flags]
    return " + ".join(found) if found else "none"


def check_quant_images(available: int, wanted: int, where: str) -> None:
    """Refuse a calibration set smaller than the images quantization asks for."""
    if wanted < 1:
        raise PteenetError(f"quant_images must be at least 1, got {wanted}", f"e.g. --quant-images {DEFAULT_QUANT_IMAGES}")
    if available < wanted:
        raise PteenetError(f"INT8 quantization asks for {wanted} calibration images and {where} holds {available}",
                           f"pass --quant-images {max(1, available)} or fewer, or calibrate on more images")


def batches(feeds: dict[str, np.ndarray], batched: Sequence[bool]) -> list[dict[str, np.ndarray]]:
    """A program's calibration inputs cut into ``QUANT_BATCH`` rows (inputs not batched, such as a
    threshold, repeated)."""
    n = next(v.shape[0] for v, b in zip(feeds.values(), batched) if b)
    return [{k: v[i:i + QUANT_BATCH] if b else v for (k, v), b in zip(feeds.items(), batched)}
            for i in range(0, n, QUANT_BATCH)]


class _Reader:
    """``CalibrationDataReader``'s protocol over a list of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def output_params(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each output of a quantized program that leaves through a DequantizeLinear: its (scale, zero
    point), for the next program's input (``quantize_program``'s ``inputs_as``)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    for o in g.output:
        node = producer.get(o.name)
        if node is not None and node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[1] in inits:
            out[o.name] = (inits[node.input[1]], inits[node.input[2]])
    return out


def quantize_program(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], what: str, signed_activations: bool = False,
                     inputs_as: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """``src`` (FP32 ONNX) as static INT8 at ``dst`` (``SETTINGS``), its ranges from ``feeds``; a
    failure is one error naming ``what`` (e.g. "piece 2 (stages 5-9)"). ``signed_activations``:
    int8 activations instead (S8S8), for comparison only. ``inputs_as``: inputs quantized with the
    (scale, zero point) of the program that produces them (``output_params``), so that where two
    programs are joined the dequantize-quantize pair between them is the identity, which ONNX
    Runtime removes (int8 flows on), and the values stay those of the programs run one by one."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise PteenetError(f"cannot quantize {what}: no calibration data", "give calibration images (--quant-images N)")
    # The quantizer logs advice and every tensor it leaves alone on the root logger: not the user's business.
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"TensorQuantOverrides": {k: [{"scale": sc, "zero_point": zp}]
                                                                for k, (sc, zp) in (inputs_as or {}).items()}})
    except PteenetError:
        raise
    except Exception as e:
        raise PteenetError(f"cannot quantize {what} to INT8: {describe_error(e)}",
                           "export without --quantize (FP32), or report the model's operators") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)



class QuantizedParts:
    """Every backbone stage of a model as its own static INT8 program (``StageProgram``: in0.. ->
    out0.., the tap last), quantized on the FP32 values it sees, and every computed head as an FP32
    program (``HeadProgram``: in0 tap, in1 threshold -> logits, leave, conf) reading the stage's
    dequantized tap; any batch size. The INT8 sweep caches and prices them; the INT8 export composes
    its pieces and its backbone from them, so the program that ships computes what the sweep measured.

    Heads stay FP32 because INT8 makes them slower: a pooled MLP head is a pooling and two small
    matrix products, where quantize/dequantize pairs cost more than the int8 arithmetic saves (on
    CIFAR ResNet-56 an INT8 head cost 2.6 times its INT8 stage, against 0.96 for an FP32 head on
    an FP32 stage; ``benchmarks/results/archive/cifar10_int8-int8-heads.json``). On ResNet-50 at 224
    px it is the other way round (an FP32 head 0.50 of its INT8 stage, quantized 0.42;
    ``benchmarks/results/int8_overheads.json`` and its archived run): choosing per model is open."""

    def __init__(self, folder: Path, num_stages: int, heads: Sequence[int], images: int, policy: str,
                 head_folder: Path | None = None) -> None:
        self.folder, self.num_stages, self.heads, self.images = folder, num_stages, list(heads), images
        self.policy = policy  # the decision the heads' ``leave`` output computes
        self.head_folder = head_folder or folder

    def stage_file(self, k: int) -> Path:
        return self.folder / f"stage{k}.onnx"

    def head_file(self, k: int) -> Path:
        return self.head_folder / f"head{k}.onnx"

    def for_model(self, model: EarlyExitModel, images: torch.Tensor, folder: Path) -> QuantizedParts:
        """These stage programs with heads that decide as ``model`` does now: a head computes
        ``leave`` by the policy it was exported with, so where the model's policy (or the set of
        computed heads) changed since (a setting chosen after quantizing), its heads are exported
        again into ``folder``. The stages, and so every value the exits read, stay the same."""
        computed = model.computed_branches()
        if model.policy == self.policy and all(k in self.heads for k in range(model.num_exits) if computed[k]):
            return self
        folder.mkdir(parents=True, exist_ok=True)
        return QuantizedParts(self.folder, self.num_stages, export_heads(model, images, folder), self.images, model.policy, folder)

    def sessions(self, threads: int | None) -> tuple[list[Any], dict[int, Any]]:
        from .onnx import ort_session

        return ([ort_session(str(self.stage_file(k)), threads) for k in range(self.num_stages)],
                {k: ort_session(str(self.head_file(k)), threads) for k in self.heads})


def quantize_parts(model: EarlyExitModel, images: torch.Tensor, folder: Path) -> QuantizedParts:
    """``QuantizedParts`` of ``model`` in ``folder``, quantized on ``images`` (preprocessed
    calibration images). Deterministic: the same model and images give the same programs."""
    from .onnx import StageProgram

    if model.chained or model.runtime != "staged":
        why = "a cascade or an ensemble" if model.chained else "a backbone that could not be traced"
        raise PteenetError(f"INT8 programs do not support {why}",
                           "export or sweep in FP32 (drop --quantize), or attach without --cascade and train without --ensemble")
    folder.mkdir(parents=True, exist_ok=True)
    stages = model.stages.modules
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    with torch.no_grad():
        for chunk in images.detach().float().cpu().split(QUANT_BATCH):
            state: tuple[torch.Tensor, ...] = (chunk,)
            for k, stage in enumerate(stages):
                feeds.setdefault(f"stage{k}", []).append({f"in{i}": v.numpy() for i, v in enumerate(state)})
                out = StageProgram(stage)(*state)
                state = out[:-1]
        example: tuple[torch.Tensor, ...] = (images[:2].detach().float().cpu(),)
        upstream: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the previous stage's outputs, as in0..
        for k, stage in enumerate(stages):
            out = StageProgram(stage)(*example)
            _quantized(StageProgram(stage), example, [True] * len(example), [f"out{j}" for j in range(len(out))],
                       folder, f"stage{k}", feeds[f"stage{k}"], f"backbone stage {k}", upstream)
            params = output_params(folder / f"stage{k}.onnx")
            upstream = {f"in{j}": params[f"out{j}"] for j in range(len(out) - 1) if f"out{j}" in params}
            example = out[:-1]
    return QuantizedParts(folder, len(stages), export_heads(model, images, folder), images.shape[0], model.policy)


def export_heads(model: EarlyExitModel, images: torch.Tensor, folder: Path) -> list[int]:
    """Every computed head of ``model`` as an FP32 program in ``folder`` (``head{k}.onnx``: in0 tap, in1
    threshold -> logits, leave, conf; ``leave`` by the model's policy); returns their exits."""
    from .onnx import HeadProgram, StageProgram, export_onnx

    computed = model.computed_branches()
    heads = [k for k in range(model.num_exits) if computed[k]]
    example: tuple[torch.Tensor, ...] = (images[:2].detach().float().cpu(),)  # two rows: the batch stays dynamic
    with torch.no_grad():
        for k, stage in enumerate(model.stages.modules[:max(heads, default=-1) + 1]):
            out = StageProgram(stage)(*example)
            if k in heads:
                export_onnx(HeadProgram(model.branches[k], model.policy), (out[-1], torch.tensor([0.5])), folder / f"head{k}.onnx",
                            [True, False], output_names=["logits", "leave", "conf"], hint="drop --quantize (FP32)")
            example = out[:-1]
    return heads


def _quantized(module: torch.nn.Module, args: tuple[torch.Tensor, ...], batched: list[bool], outputs: list[str],
               folder: Path, name: str, feeds: list[dict[str, np.ndarray]], what: str,
               inputs_as: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    from .onnx import export_onnx

    fp32 = folder / f"{name}.fp32.onnx"
    export_onnx(module, args, fp32, batched, output_names=outputs, hint="drop --quantize (FP32)")
    quantize_program(fp32, folder / f"{name}.onnx", feeds, what, inputs_as=inputs_as)
    fp32.unlink()


def join(parts: QuantizedParts, first: int, last: int, head: bool, inputs: list[str], outputs: list[str]) -> Any:
    """Stages ``first``..``last`` (and ``last``'s head) as one ONNX program: each part's inputs fed
    from the one before by Identity nodes (free in ONNX Runtime), inputs and outputs renamed as a
    piece's (``inputs``: the state, then ``threshold`` with a head; ``outputs``: the state passed on,
    then ``logits`` and ``leave``; at the backbone's end ``logits`` alone)."""
    import onnx
    from onnx import compose, helper

    models = [(f"st{k}_", onnx.load(str(parts.stage_file(k)))) for k in range(first, last + 1)]
    if head:
        models.append((f"hd{last}_", onnx.load(str(parts.head_file(last)))))
    models = [(p, compose.add_prefix(m, p)) for p, m in models]
    nodes, inits, vinfo = [], [], []
    for _, m in models:
        nodes += list(m.graph.node)
        inits += list(m.graph.initializer)
        vinfo += list(m.graph.value_info)
    link = [helper.make_node("Identity", [src], [dst]) for src, dst in _links(models, head, inputs)]
    stage_in = [n for n in inputs if n != "threshold"]
    g_in = [_renamed(models[0][1].graph.input[i], n) for i, n in enumerate(stage_in)]
    g_in += [_renamed(models[-1][1].graph.input[1], "threshold")] if head else []
    last_stage = models[len(models) - 1 - head][1]
    sources = list(last_stage.graph.output)[:len(outputs) - 2] + list(models[-1][1].graph.output)[:2] if head \
        else list(last_stage.graph.output)[:1]
    out_links = [helper.make_node("Identity", [src.name], [name]) for name, src in zip(outputs, sources)]
    g_out = [_renamed(src, name) for name, src in zip(outputs, sources)]
    graph = helper.make_graph(_live(link + nodes + out_links, outputs), "piece", g_in, g_out, inits, value_info=vinfo)
    return helper.make_model(graph, opset_imports=models[0][1].opset_import, ir_version=models[0][1].ir_version)


def _links(models: list[tuple[str, Any]], head: bool, inputs: list[str]) -> list[tuple[str, str]]:
    """(source, input) pairs: the piece's inputs into the first stage, each stage's state into the
    next, the last stage's tap and the threshold into the head."""
    pairs = [(name, models[0][1].graph.input[i].name) for i, name in enumerate(inputs) if name != "threshold"]
    stages = models[:len(models) - head]
    for (_, a), (_, b) in zip(stages, stages[1:]):
        pairs += [(a.graph.output[i].name, b.graph.input[i].name) for i in range(len(b.graph.input))]
    if head:
        h, s = models[-1][1], stages[-1][1]
        pairs += [(s.graph.output[len(s.graph.output) - 1].name, h.graph.input[0].name), ("threshold", h.graph.input[1].name)]
    return pairs


def _renamed(info: Any, name: str) -> Any:
    out = type(info)()
    out.CopyFrom(info)
    out.name = name
    return out


def _live(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """The nodes some output needs: a stage's tap where no head reads it, computed and quantized
    for nothing otherwise (ONNX Runtime keeps nodes whose outputs nobody reads)."""
    needed, size = set(outputs), -1
    while len(needed) != size:  # the nodes are not in order (the links come first): to a fixed point
        size = len(needed)
        for node in nodes:
            if any(o in needed for o in node.output):
                needed.update(i for i in node.input if i)
    return [n for n in nodes if any(o in needed for o in n.output)]
