"""`init.from`: a run's initial weights read from a file into this rank's part of the model (any layout).

Sources (`open_source`), each seen as tensors under our parameter names with their global shapes:
  * our weights file `NAME.safetensors` + `NAME.json` (what every run writes as weights.safetensors);
  * a checkpoint directory `step_XXXXXXXX` (weights only; its optimizer state is ignored), or a `checkpoints/`
    directory (its newest complete checkpoint);
  * a Hugging Face directory: Mixtral (interop/hf.py), dense Llama / Mistral (interop/hf_dense.py).

Loading runs after the model is built and sharded, before the engine takes the parameters (ZeRO copies them into
its partitions). Each parameter is filled from the source's global tensor cut to this rank's region (its ShardSpec:
tensor-parallel slices, the experts this rank holds, FSDP2 rows), so every layout starts from the same model. All
mismatches (missing, unexpected, differently shaped tensors) are reported together, naming the path, before any
parameter is written. With `init.upcycle` the MoE layers' experts come from the dense FFNs (models/upcycle.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from moe_train.checkpoint import manager
from moe_train.checkpoint.storage import ChunkReader
from moe_train.config.init import InitConfig
from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig
from moe_train.interop import hf, hf_dense
from moe_train.models import upcycle
from moe_train.models.shard_spec import ShardSpec, persistent_buffers, tensor_specs

Read = Callable[[str], torch.Tensor]  # our parameter name -> its whole (global) tensor


@dataclass
class WeightSource:
    path: str
    kind: str  # for messages: "weights file", "checkpoint step_00000100", "Hugging Face Llama directory"
    model_cfg: ModelConfig
    moe_cfg: MoEConfig
    shapes: dict[str, tuple[int, ...]]  # our parameter name -> global shape
    read: Read
    run_config: Optional[dict] = None  # the whole Config of the run that wrote it (checkpoints, run directories)
    layout: Optional[dict] = None  # that run's world_size, dp, ep, tp


def open_source(path, distributed: bool = False) -> WeightSource:
    """The weights at `path` (a file or directory as described above); ValueError naming the path otherwise.
    Collective when `distributed` and `path` is a checkpoint (its files are verified over the ranks)."""
    try:
        return _open_source(Path(path), distributed)
    except ValueError as err:  # the readers name the file they failed on; say which init.from it came from
        raise ValueError(f"init.from={str(path)!r}: {err}") from err


def _open_source(p: Path, distributed: bool) -> WeightSource:
    if p.is_file() or p.suffix == ".safetensors":
        return weights_file_source(p)
    if not p.is_dir():
        raise ValueError("no such file or directory")
    if (p / manager.MANIFEST).is_file():
        return checkpoint_source(p, distributed)
    if (p / "config.json").is_file():
        return hf_source(p)
    newest = manager.complete_checkpoints(p)
    if newest:
        return checkpoint_source(newest[0], distributed)
    raise ValueError(f"a directory with neither {manager.MANIFEST} (a checkpoint), config.json (a Hugging Face "
                     f"model) nor complete step_XXXXXXXX checkpoints")


def weights_file_source(path: Path) -> WeightSource:
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    model_cfg, moe_cfg = hf.read_weights_config(path)
    reader = hf.weights_reader(path)
    shapes = {key: reader.shape_of(key) for key in reader.keys()}
    sidecar = hf.read_weights_sidecar(path)
    return WeightSource(str(path), "weights file", model_cfg, moe_cfg, shapes, reader.get, run_config_of(path, sidecar),
                        sidecar.get("layout"))


def run_config_of(path: Path, sidecar: dict) -> Optional[dict]:
    """The run config a weights file carries in its sidecar (written by moe-train-compress), else a run directory's
    resolved config.yaml beside its weights.safetensors, else None."""
    if "run" in sidecar:
        return sidecar["run"]
    run_yaml = path.parent / "config.yaml"
    return _load_yaml(run_yaml) if run_yaml.is_file() else None


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def checkpoint_source(directory: Path, distributed: bool) -> WeightSource:
    manifest = manager.verify_everywhere(directory, distributed)  # collective when distributed
    config, where = manifest["config"], str(directory / manager.MANIFEST)
    model_cfg = hf.dataclass_from_dict(ModelConfig, config["model"], where)
    moe_cfg = hf.dataclass_from_dict(MoEConfig, config["moe"], where)
    chunks = ChunkReader(directory, manifest["tensors"])
    shapes = {key[len("model/"):]: tuple(entry["global_shape"]) for key, entry in manifest["tensors"].items()
              if key.startswith("model/")}
    return WeightSource(str(directory), f"checkpoint {directory.name}", model_cfg, moe_cfg, shapes,
                        lambda name: chunks.read_full(f"model/{name}"), config, manifest["layout"])


def hf_source(directory: Path) -> WeightSource:
    hf_config, files = hf.read_hf_dir(directory)
    reader = hf.SafetensorsReader(files)
    model_cfg, moe_cfg, recipes = hf_dense.hf_layout(hf_config, reader.keys(), directory / "config.json")
    shapes = {k: tuple(v.shape) for k, v in hf.meta_model(model_cfg, moe_cfg).state_dict().items()}
    dtype = reader.dtype_of("model.embed_tokens.weight")

    def read(name: str) -> torch.Tensor:
        out = torch.empty(shapes[name], dtype=dtype)
        recipes[name].fill(out, reader.get)
        return out

    family = hf.HF_FAMILIES[hf_config["model_type"]][0]
    return WeightSource(str(directory), f"Hugging Face {family} directory", model_cfg, moe_cfg, shapes, read)


# ---------------------------------------------------------------------------------------------------------------------
# Plans: for every parameter of this run, how its region is made (None: keep the fresh initialisation)
# ---------------------------------------------------------------------------------------------------------------------

Region = Callable[[ShardSpec, torch.device], Optional[torch.Tensor]]


def copy_region(source: WeightSource, name: str) -> Region:
    return lambda spec, device: source.read(name).to(device)[spec.local_slices()]


def shape_problem(source: WeightSource, name: str, spec: ShardSpec) -> list[str]:
    shape = source.shapes.get(name)
    if shape is None:
        return [f"{name}: missing from the source (this run: {list(spec.global_shape)})"]
    if shape != spec.global_shape:
        return [f"{name}: source {list(shape)}, this run {list(spec.global_shape)}"]
    return []


def unexpected(source: WeightSource, used: set[str]) -> list[str]:
    return [f"{name}: in the source {list(source.shapes[name])}, not in this run's model"
            for name in sorted(set(source.shapes) - used)]


def direct_plan(source: WeightSource, specs: dict[str, ShardSpec],
                optional: frozenset[str] = frozenset()) -> tuple[dict[str, Optional[Region]], list[str]]:
    """Same names and shapes: (plan, problems). `optional` names (persistent buffers: a balancing bias switched on
    for this run) may be missing from the source: they keep their initial value (plan None)."""
    specs = {name: spec for name, spec in specs.items() if name in source.shapes or name not in optional}
    problems = [problem for name, spec in specs.items() for problem in shape_problem(source, name, spec)]
    return {name: copy_region(source, name) for name in specs}, problems + unexpected(source, set(specs))


@dataclass(frozen=True)
class UpcycleSettings:
    granularity: int
    noise: float
    routed_scale: float
    seed: int
    init_std: float


def expert_region(source: WeightSource, dense_name: str, which: str, name: str, up: UpcycleSettings) -> Region:
    """This rank's experts of stack `name` cut from the dense tensor, then the trailing dims (tensor parallelism)."""
    def region(spec: ShardSpec, device) -> torch.Tensor:
        dense = source.read(dense_name).to(device)
        experts = range(spec.offsets[0], spec.offsets[0] + spec.shape[0])
        values = [upcycle.expert_weight(dense, which, e, up.granularity, up.routed_scale, up.noise, up.seed, name)
                  for e in experts]
        return torch.stack(values)[(slice(None),) + spec.local_slices()[1:]]
    return region


def router_region(name: str, up: UpcycleSettings) -> Optional[Region]:
    """g = 1: the fresh init as it is (None). g > 1: the init with each virtual group's rows tied."""
    if up.granularity == 1:
        return None
    return lambda spec, device: upcycle.tied_router(spec.global_shape, up.init_std, up.granularity, up.seed, name,
                                                    device)[spec.local_slices()]


def check_dense_ffn(source: WeightSource, dense_name: str, name: str, spec: ShardSpec, g: int) -> list[str]:
    """The dense FFN weight an expert stack [E, Fe, D] / [E, D, Fe] is cut from must be [g Fe, D] / [D, g Fe]."""
    shape = source.shapes.get(dense_name)
    expert = spec.global_shape[1:]
    wanted = (expert[0], expert[1] * g) if name.endswith("w2") else (expert[0] * g, expert[1])
    if shape is None:
        return [f"{dense_name}: missing from the source (needed by {name}, upcycled from it)"]
    if shape != wanted:
        return [f"{dense_name}: source {list(shape)}, but {name} {list(spec.global_shape)} with "
                f"init.upcycle_granularity={g} needs {list(wanted)} (dense width = granularity x moe.d_ff)"]
    return []


def upcycle_plan(source: WeightSource, specs: dict[str, ShardSpec],
                 up: UpcycleSettings) -> tuple[dict[str, Region], list[str]]:
    """Parameters outside the MoE layers as direct_plan; routed experts from the same layer's dense FFN; the
    router from the fresh init (tied per virtual group when g > 1); the noise weight fresh."""
    plan, problems, used = {}, [], set()
    for name, spec in specs.items():
        prefix, _, rest = name.partition(".moe.")
        if not rest:
            problems += shape_problem(source, name, spec)
            plan[name] = copy_region(source, name)
            used.add(name)
        elif rest.startswith("experts."):
            which = rest.removeprefix("experts.")
            dense_name = f"{prefix}.feed_forward.{which}.weight"
            problems += check_dense_ffn(source, dense_name, name, spec, up.granularity)
            plan[name] = expert_region(source, dense_name, which, name, up)
            used.add(dense_name)
        elif rest == "router.weight":
            plan[name] = router_region(name, up)
    return plan, problems + unexpected(source, used)


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

SKIPPED_FIELDS = ("init_std", "max_seq_len")  # neither changes what the weights compute


def config_differences(source: WeightSource, model_cfg: ModelConfig, moe_cfg: MoEConfig, upcycle: bool) -> list[str]:
    """`section.field=this run's (source ...)` for every config field that differs from the source's."""
    pairs = [("model", source.model_cfg, model_cfg)] + ([] if upcycle else [("moe", source.moe_cfg, moe_cfg)])
    return [f"{section}.{f.name}={getattr(ours, f.name)!r} (source {getattr(theirs, f.name)!r})"
            for section, theirs, ours in pairs for f in fields(ours)
            if f.name not in SKIPPED_FIELDS and getattr(theirs, f.name) != getattr(ours, f.name)
            and not (upcycle and f.name in ("moe_every", "d_ff"))]


def build_plan(model: nn.Module, source: WeightSource, cfg: InitConfig, seed: int) -> dict[str, Optional[Region]]:
    """The plan, or ValueError naming the path and listing every tensor that does not fit."""
    if cfg.upcycle and source.model_cfg.moe_every != 0:
        raise ValueError(f"init.upcycle=true needs a dense source, but init.from={source.path!r} ({source.kind}) "
                         f"has MoE layers (model.moe_every={source.model_cfg.moe_every})")
    if cfg.upcycle:
        up = UpcycleSettings(cfg.upcycle_granularity, cfg.upcycle_noise, model.moe_cfg.routed_scale, seed,
                             model.cfg.init_std)
        plan, problems = upcycle_plan(source, tensor_specs(model), up)
    else:
        plan, problems = direct_plan(source, tensor_specs(model), frozenset(persistent_buffers(model)))
    if problems:
        differences = config_differences(source, model.cfg, model.moe_cfg, cfg.upcycle)
        hint = f"\n  this run's config differs from the source's: {', '.join(differences)}" if differences else ""
        raise ValueError(f"init.from={source.path!r} ({source.kind}) does not fit this run's model; "
                         f"{len(problems)} tensor(s) differ:\n  " + "\n  ".join(problems) + hint)
    return plan


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, Optional[Region]]) -> None:
    """Each parameter's local region (FSDP2: this rank's rows of the DTensor) and each persistent buffer from its
    plan entry."""
    specs = tensor_specs(model)
    for name, p in [*model.named_parameters(), *persistent_buffers(model).items()]:
        region = plan.get(name)
        if region is not None:
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(region(specs[name], local.device))


def load_initial_weights(model: nn.Module, cfg: InitConfig, seed: int, distributed: bool = False,
                         say: Callable[[str], None] = print) -> WeightSource:
    """Fill this rank's part of `model` (built, sharded, initialised) from `cfg.path`, upcycling if asked.
    Collective when `distributed` and the source is a checkpoint (verification)."""
    source = open_source(cfg.path, distributed)
    load_from_source(model, source, cfg, seed, say)
    return source


def load_from_source(model: nn.Module, source: WeightSource, cfg: InitConfig, seed: int,
                     say: Callable[[str], None] = print) -> None:
    """load_initial_weights from an opened source."""
    plan = build_plan(model, source, cfg, seed)
    apply_plan(model, plan)
    origin = f"{source.kind} {source.path}"
    say(f"initial weights upcycled (granularity {cfg.upcycle_granularity}, noise {cfg.upcycle_noise}) from the "
        f"dense model in {origin}" if cfg.upcycle else f"initial weights from {origin}")
    differences = config_differences(source, model.cfg, model.moe_cfg, cfg.upcycle)
    if differences:
        say(f"note: this run's config differs from the source's in {', '.join(differences)}")
