"""The command line's flags and how they become a `MergeSpec` and planning keywords.

Imports nothing that imports torch at module level: `leanmerge --help` builds every command's
options from here and must stay fast. The spec is built by `build_spec`, which imports the
engine (`engine.load`) when a command runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from engine import load
from engine.budget import parse_bytes
from engine.defaults import DEFAULT_SHARD_SIZE, METHOD_NAMES, NO_MODEL_METHODS, VOCAB_POLICIES
from engine.errors import SpecError
from engine.hub import HubCache, resolve_model
from engine.paths import folder_problem, split_model_arg

if TYPE_CHECKING:
    from engine.methods.base import Method, ParamValue
    from engine.spec import MergeSpec

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

MIN_SHARD_SIZE = 10**6  # below this every tensor of a real model gets a file of its own
# Parameter flags: (keyword, parameter name). Booleans are --name/--no-name.
PARAM_FLAGS = (
    ("weight", "weight"),
    ("lambda_", "lambda"),
    ("density", "density"),
    ("t", "t"),
    ("gamma", "gamma"),
    ("epsilon", "epsilon"),
    ("normalize", "normalize"),
    ("rescale", "rescale"),
)
# mergekit's flags that have nothing to do here, and why (said in one line when given).
NOT_NEEDED = {
    "lazy_unpickle": "is not needed here: nothing is unpickled (safetensors are read block by block, .bin weights-only)",
    "allow_crimes": "changes nothing here: only homologous models (same tensor names and shapes) merge, checked per tensor",
    "low_cpu_memory": "is not needed here: --max-memory (RAM) and --max-gpu-memory bound the memory",
    "trust_remote_code": "is not needed here: no code from the models is run",
    "clone_tensors": "is not needed here: every output tensor is written from its own buffers",
}
# leanmerge's own flags that no longer do anything, and why (said in one line when given).
RETIRED = {
    "compile_mode": (
        "--compile",
        "is ignored: compiled kernels were retired (the C extension runs every method's merge on the CPU)",
    ),
}


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.5
    """A size flag: bytes, decimal or binary units, or mergekit's `5B`; at least `minimum`."""

    name = "size"

    def __init__(self, minimum: int = 1, why: str = "") -> None:
        self.minimum, self.why = minimum, why

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_bytes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if size < self.minimum:
            self.fail(f"{value!r} is {size:,} bytes, below the {self.minimum:,}-byte minimum: {self.why}", param, ctx)
        return size


SIZE = ByteSize()
SHARD_SIZE = ByteSize(MIN_SHARD_SIZE, "every tensor would get a file of its own; write e.g. 5B (mergekit's 5e9) or 2GB")


def _apply(f: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        f = option(f)
    return f


def spec_options(f: F) -> F:
    """The flags that describe a merge, shared by `merge`, `plan` and `verify`."""
    return _apply(
        f,
        [
            click.argument("config", required=False, type=click.Path(path_type=Path)),
            click.option(
                "--base", type=click.Path(path_type=Path), help="Base model folder, or Hub id OWNER/NAME[@REVISION]."
            ),
            click.option(
                "--model",
                "models",
                multiple=True,
                metavar="DIR[:WEIGHT]",
                help="Fine-tuned model folder (or Hub id); repeat.",
            ),
            click.option("--method", type=click.Choice(METHOD_NAMES), help="Merge method."),
            click.option("--weight", type=float, metavar="X", help="Weight of every model without its own :WEIGHT."),
            click.option(
                "--lambda",
                "lambda_",
                type=float,
                metavar="X",
                help="Scale of the merged delta (task arithmetic, TIES, ...).",
            ),
            click.option(
                "--density", type=float, metavar="X", help="Fraction of each delta kept, in (0, 1] (DARE, TIES, ...)."
            ),
            click.option(
                "--t", type=float, metavar="X", help="SLERP: interpolation from the base (0) to the model (1)."
            ),
            click.option(
                "--gamma",
                type=float,
                metavar="X",
                help="breadcrumbs: fraction of the largest deltas dropped, in [0, 1).",
            ),
            click.option(
                "--epsilon",
                type=float,
                metavar="X",
                help="DELLA: spread of the keep probabilities around density, >= 0.",
            ),
            click.option("--normalize/--no-normalize", default=None, help="Divide by the sum of weights."),
            click.option(
                "--rescale/--no-rescale", default=None, help="DARE: divide survivors by density (off = DropOnly)."
            ),
            click.option(
                "--param",
                "param",
                multiple=True,
                metavar="NAME=VALUE",
                help="Any parameter of the method, as under the YAML's top-level parameters (e.g. "
                "--param select_topk=0.5); repeat.",
            ),
            click.option("--seed", "--random-seed", "seed", type=int, help="Seed of the random masks (default 0)."),
            click.option("--out-dtype", help="Output float dtype: bf16, fp16, fp32 (default: the base's)."),
            click.option(
                "--mergekit-rounding",
                is_flag=True,
                default=None,
                help="Round inputs and every intermediate to the output dtype as mergekit does (linear, "
                "task_arithmetic): mergekit's bytes instead of one rounding on write.",
            ),
            click.option(
                "--vocab",
                type=click.Choice(VOCAB_POLICIES),
                help="Embedding rows when models add tokens: the base's (default) or the union of all models'.",
            ),
        ],
    )


def plan_options(f: F) -> F:
    """The flags that shape the plan (memory, device, shards), shared by `merge` and `plan`."""
    return _apply(
        f,
        [
            click.option(
                "--max-memory",
                type=SIZE,
                help="Peak RSS ceiling for the whole process (default: half of free RAM, at most 3/4 of the "
                "cgroup's memory limit and half of what ulimit -v leaves).",
            ),
            click.option("--block-size", type=SIZE, help="Bytes per input stream per block (overrides the planner)."),
            click.option(
                "--device",
                default="auto",
                show_default=True,
                metavar="auto|cpu|cuda[:N]",
                help="Where the arithmetic runs (auto: CUDA when present). Same bytes on both.",
            ),
            click.option("--cuda/--no-cuda", default=None, help="mergekit's: --device cuda (--no-cuda: --device cpu)."),
            click.option("--max-gpu-memory", type=SIZE, help="Device memory ceiling on CUDA (default: 80% of free)."),
            click.option(
                "--hold/--no-hold",
                default=True,
                show_default=True,
                help="Read a tensor with statistics passes (TIES, DELLA, SLERP, ...) once and hold it for all of "
                "them where the budget has room; --no-hold reads it once per pass (the least memory).",
            ),
            click.option(
                "--direct-io/--buffered-io",
                default=True,
                show_default=True,
                help="Read inputs with O_DIRECT (no page cache, no copy); buffered is faster only for inputs "
                "already cached (and then tensors of two passes are read twice rather than held).",
            ),
            click.option(
                "--shard-size",
                "--out-shard-size",
                "shard_size",
                type=SHARD_SIZE,
                default=DEFAULT_SHARD_SIZE,
                help="Largest output shard (mergekit's 5B is 5GB).  [default: 5GB]",  # not 5000000000
            ),
            # retired (compiled kernels): still accepted, so that scripts that give it keep working
            click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), hidden=True),
        ],
    )


def mergekit_options(f: F) -> F:
    """mergekit's flags that need nothing here: accepted, hidden, and said so in one line."""
    return _apply(f, [click.option(f"--{k.replace('_', '-')}", k, is_flag=True, hidden=True) for k in NOT_NEEDED])


def say_not_needed(kw: dict[str, Any]) -> None:
    """One line per mergekit flag, or retired flag of ours, given that does nothing here (and
    drop it from `kw`)."""
    for key, why in NOT_NEEDED.items():
        if kw.pop(key, False):
            log.warning("--%s %s", key.replace("_", "-"), why)
    for key, (flag, why) in RETIRED.items():
        if kw.pop(key, None) is not None:
            log.warning("%s %s", flag, why)


def planning(kw: dict[str, Any]) -> dict[str, Any]:
    """The `plan_options` flags as `prepare`/`merge` keywords: `merge` and `plan` pass the same
    ones, so the plan shown is the plan run."""
    device = kw["device"]
    if kw["cuda"] is not None:
        wanted = "cuda" if kw["cuda"] else "cpu"
        if device != "auto" and device.split(":")[0] != wanted:
            raise click.UsageError(f"--{'' if kw['cuda'] else 'no-'}cuda contradicts --device {device}")
        device = device if device != "auto" else wanted
    return {
        "max_memory": kw["max_memory"],
        "block_bytes": kw["block_size"],
        "shard_size": kw["shard_size"],
        "device": device,
        "max_gpu_memory": kw["max_gpu_memory"],
        "hold": kw["hold"],
        "direct_io": kw["direct_io"],
    }


def build_spec(kw: dict[str, Any], hub: HubCache | None = None) -> MergeSpec:
    """One MergeSpec from a YAML file and/or flags; flags override the file's globals. Models
    named by Hub ids are read from (or downloaded to) `hub` (engine.hub)."""
    if kw["config"] is None:
        hub_flags(kw, hub)
        check_flags(kw)  # before the engine's import: a wrong path is said at once
    load()
    from engine.config import load_config
    from engine.methods.registry import METHODS
    from engine.spec import cli_spec

    if kw["config"] is not None:
        if kw["base"] or kw["models"]:
            raise SpecError("give either a CONFIG file or --base/--model flags, not both")
        overrides = {"method": kw["method"], "out_dtype": kw["out_dtype"], "seed": kw["seed"], "vocab": kw["vocab"],
                     "mergekit_rounding": kw.get("mergekit_rounding")}  # fmt: skip
        spec = load_config(kw["config"], overrides, hub=hub)
        params = flag_params(kw, spec.method_impl)
        params |= named_params(kw.get("param", ()), spec.method_impl, params)
        return dataclasses.replace(spec, params={**spec.params, **params}) if params else spec
    method = METHODS[kw["method"]]
    params = flag_params(kw, method)
    params |= named_params(kw.get("param", ()), method, params)
    spec = cli_spec(method.name, kw["base"], kw["models"], params, kw["out_dtype"], kw["seed"])
    extra = {k: kw[k] for k in ("vocab", "mergekit_rounding") if kw.get(k)}
    return dataclasses.replace(spec, **extra) if extra else spec


def flag_params(kw: dict[str, Any], method: Method) -> dict[str, ParamValue]:
    """The parameter flags given, checked as the YAML's are (one rule): a value out of range or
    not finite is an error naming the flag; a parameter the method does not use, a warning."""
    from engine.spec import check_params

    params: dict[str, ParamValue] = {}
    for key, name in PARAM_FLAGS:
        value = kw[key]
        if value is None:
            continue
        flag = f"--{'no-' if value is False else ''}{name}"
        if method.param(name) is None:
            log.warning("%s is not used by %s; ignored", flag, method.name)
            continue
        check_params(method, {name: value}, flag, per_model=False)
        params[name] = value
    return params


def named_params(typed: tuple[str, ...], method: Method, given: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """`--param NAME=VALUE` flags -> global parameters, each typed as the method declares it and
    checked as the YAML's; a name the method does not declare, or one given twice (here or by
    its own flag, in `given`), is an error in one line."""
    from engine.spec import check_params

    params: dict[str, ParamValue] = {}
    known = ", ".join(p.name for p in method.params)
    allowed = f"parameters of {method.name}: {known}" if known else f"{method.name} takes no parameters"
    for arg in typed:
        name, eq, raw = arg.partition("=")
        name, flag = name.strip(), f"--param {arg}"
        if not eq or not name:
            raise SpecError(f"{flag}: expected NAME=VALUE ({allowed})")
        d = method.param(name)
        if d is None:
            raise SpecError(f"{flag}: {method.name} has no parameter {name!r} ({allowed})")
        if name in params or name in given:
            raise SpecError(f"{flag}: {name!r} is given twice; give it once")
        value = _typed(raw.strip(), d.default, flag)
        check_params(method, {name: value}, flag, per_model=False)
        params[name] = value
    return params


def _typed(raw: str, default: ParamValue, flag: str) -> ParamValue:
    """A command-line value read as the type of the parameter's default (true/false, a string,
    a number)."""
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise SpecError(f"{flag}: must be true or false, got {raw!r}")
        return raw.lower() == "true"
    if isinstance(default, str):
        return raw
    try:
        return int(raw) if raw.lstrip("+-").isdigit() else float(raw)  # an int as YAML reads one
    except ValueError:
        raise SpecError(f"{flag}: must be a number, got {raw!r}") from None


def hub_flags(kw: dict[str, Any], hub: HubCache | None) -> None:
    """--base and --model given as Hub ids (`OWNER/NAME[@REV][:WEIGHT]`) -> their cache folders;
    local paths stay as typed."""
    if kw["base"] is not None:
        kw["base"] = Path(_hub_flag("--base", str(kw["base"]), hub))
    models = []
    for arg in kw["models"]:
        typed, _ = split_model_arg(arg)
        models.append(_hub_flag("--model", typed, hub) + arg[len(typed) :])  # the :WEIGHT kept as typed
    kw["models"] = tuple(models)


def hub_folders(typed: Sequence[str], hub: HubCache | None) -> tuple[Path, ...]:
    """Model arguments (`inspect`'s FOLDERS) -> folders: a Hub id its cache snapshot, a path as typed."""
    return tuple(resolve_model(t, Path(), hub) for t in typed)


def _hub_flag(flag: str, typed: str, hub: HubCache | None) -> str:
    try:
        folder = resolve_model(typed, Path(), hub)
    except SpecError as e:
        raise SpecError(f"{flag}: {e}") from None
    return typed if folder == Path(typed).expanduser() else str(folder)


def check_flags(kw: dict[str, Any]) -> None:
    """A merge given by flags names a method, a base and its models (passthrough: none), and each
    folder exists: the message is the YAML's (a Hub id says to download it first)."""
    takes_models = kw["method"] not in NO_MODEL_METHODS
    needed = (("--base", kw["base"]), ("--model", kw["models"] or not takes_models), ("--method", kw["method"]))
    missing = [f for f, v in needed if not v]
    if missing:
        raise SpecError(f"missing {', '.join(missing)} (or give a CONFIG.yaml)")
    typed = [("--base", str(kw["base"])), *(("--model", split_model_arg(arg)[0]) for arg in kw["models"])]
    for flag, value in typed:
        problem = folder_problem(Path(value).expanduser(), value)
        if problem:
            raise SpecError(f"{flag}: {problem}")
