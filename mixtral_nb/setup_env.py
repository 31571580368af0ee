"""What a notebook needs before it loads a model: an environment report, the Triton/libcuda fix,
and the notebook defaults (which model, which device, how many tokens, which memory plan).

Everything here is safe on a machine without a GPU: the report then says so, the libcuda fix does
nothing, and the defaults pick the embedded model, so every notebook runs on a laptop or in CI.

Why the Triton fix is done in-process: the article's notebook runs ``!export LD_LIBRARY_PATH=...``
and ``!export LIBRARY_PATH=...``, but each ``!`` line runs in its own short-lived shell, so those
variables never reach the Python kernel where Triton looks for ``libcuda.so.1``. Setting
``os.environ`` in the kernel itself (``TRITON_LIBCUDA_PATH``, ``LIBRARY_PATH``) does reach it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

from . import __version__, planner
from .build import parse_devices
from .checkpoint import detect_layout, download, load_config
from .config import check_int
from .embedded import build_embedded
from .kernels import available
from .load import EMBEDDED, default_device, embedded_checkpoint, embedded_quant_config, resolve
from .paths import cache_root
from .units import GiB

__all__ = ["NotebookSettings", "describe_folder", "environment_report", "find_libcuda_dir", "fix_triton_libcuda",
           "format_report", "in_colab", "memory_plan", "model_summary", "notebook_settings", "prepare_model"]

LIBCUDA = "libcuda.so.1"
# Where the driver library lives when `ldconfig -p` does not list it (Colab, containers, WSL).
LIBCUDA_CANDIDATES = ("/usr/lib64-nvidia", "/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64",
                      "/usr/lib/wsl/lib", "/usr/local/cuda/compat")
CUDA_STUBS = "/usr/local/cuda/lib64/stubs"  # libcuda.so for linking (what old Triton's -lcuda needs)
CPU_MAX_NEW_TOKENS = 8  # CPU runs (CI, laptops) answer in a few words: the point is that it works
GPU_MAX_NEW_TOKENS = 256
_PACKAGES = ("torch", "transformers", "hqq", "triton", "safetensors", "huggingface_hub", "ipywidgets", "ipykernel",
             "matplotlib", "mistral-common", "nvidia-ml-py")


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _gpus() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not torch.cuda.is_available():
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = None, p.total_memory
        out.append({
            "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
            "vram_total_gib": round(total / GiB, 2), "vram_free_gib": None if free is None else round(free / GiB, 2),
            # a T4 (7.5) has no bf16 in hardware even where torch.cuda.is_bf16_supported() says True
            "bf16": p.major >= 8, "multiprocessors": p.multi_processor_count,
        })
    return out


def environment_report() -> dict[str, Any]:
    """Facts about this machine that decide how Mixtral can run here (GPU, memory, disk, versions)."""
    vm = psutil.virtual_memory()
    cache = cache_root()
    try:
        kernels = available()
    except Exception as e:  # a broken Triton install must not break the report
        kernels = {"error": f"{type(e).__name__}: {e}"}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "colab": in_colab(),
        "kaggle": "KAGGLE_KERNEL_RUN_TYPE" in os.environ,
        "cpus": os.cpu_count(),
        "ram_total_gib": round(vm.total / GiB, 2),
        "ram_available_gib": round(vm.available / GiB, 2),
        "cache_dir": str(cache),
        "disk_free_gib": round(shutil.disk_usage(_existing(cache)).free / GiB, 2),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": _gpus(),
        "libcuda_dir": find_libcuda_dir() if torch.cuda.is_available() else None,
        "kernels": kernels,
        "versions": {"mixtral_nb": __version__, **{name: _version(name) for name in _PACKAGES}},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    r = report
    lines = [f"Python {r['python']} on {r['platform']}" + (" (Google Colab)" if r["colab"] else "")
             + (" (Kaggle)" if r["kaggle"] else "")]
    lines.append(f"CPU: {r['cpus']} cores; RAM {r['ram_total_gib']:.1f} GiB, {r['ram_available_gib']:.1f} GiB available")
    lines.append(f"disk: {r['disk_free_gib']:.1f} GiB free at {r['cache_dir']}")
    if r["gpus"]:
        for g in r["gpus"]:
            free = "?" if g["vram_free_gib"] is None else f"{g['vram_free_gib']:.1f}"
            lines.append(f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}, "
                         f"{g['vram_total_gib']:.1f} GiB VRAM ({free} GiB free), bf16 in hardware: {g['bf16']}")
        lines.append(f"CUDA {r['cuda_version']}; libcuda in {r['libcuda_dir'] or 'not found'}")
    else:
        lines.append("GPU: none (CUDA not available): the notebooks use the small embedded model on CPU")
    k = r["kernels"]
    if "error" in k:
        lines.append(f"Triton kernels: unavailable ({k['error']})")
    else:
        lines.append(f"Triton {k.get('triton_version') or 'not installed'}; fused kernels in use: {k.get('fused')}")
    lines.append("versions: " + ", ".join(f"{n} {v}" for n, v in r["versions"].items() if v))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- libcuda / Triton


def _parse_ldconfig(text: str) -> list[str]:
    """Folders holding libcuda.so.1 in `ldconfig -p` output (lines like ``libcuda.so.1 (...) => /path``)."""
    dirs: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith(LIBCUDA) and "=>" in line:
            d = os.path.dirname(line.split("=>")[-1].strip())
            if d not in dirs:
                dirs.append(d)
    return dirs


def _ldconfig_dirs() -> list[str]:
    for exe in ("/sbin/ldconfig", "ldconfig"):
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=20, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        return _parse_ldconfig(out)
    return []


def find_libcuda_dir() -> str | None:
    """The folder holding the NVIDIA driver's libcuda.so.1: ldconfig's cache, then the usual places."""
    env = os.environ.get("TRITON_LIBCUDA_PATH")
    candidates = ([env] if env else []) + _ldconfig_dirs() + list(LIBCUDA_CANDIDATES)
    candidates += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for d in candidates:
        if os.path.exists(os.path.join(d, LIBCUDA)):
            return d
    return None


def _triton_lookup() -> Any:
    """Triton's own libcuda lookup function (its location moved between Triton releases), or None."""
    for mod in ("triton.backends.nvidia.driver", "triton.common.build", "triton.runtime.build"):
        try:
            fn = getattr(importlib.import_module(mod), "libcuda_dirs", None)
        except Exception:
            continue
        if fn is not None:
            return fn
    return None


def _prepend(var: str, folder: str) -> None:
    parts = [p for p in os.environ.get(var, "").split(":") if p]
    if folder not in parts:
        os.environ[var] = ":".join([folder, *parts])


def fix_triton_libcuda() -> str | None:
    """Let Triton find libcuda in this kernel process, only when it cannot on its own.

    Returns the folder it pointed Triton at, or None when nothing was needed (no CUDA GPU, no
    Triton, or Triton already finds the library). Sets ``TRITON_LIBCUDA_PATH`` (read by Triton 3
    when it compiles its launcher) and prepends the folder (and CUDA's stub folder, if present) to
    ``LIBRARY_PATH`` for the C compiler Triton runs; both are inherited by the compiler processes.
    """
    if not torch.cuda.is_available():
        return None
    lookup = _triton_lookup()
    if lookup is None:
        return None  # no Triton: mixtral_nb uses its pure-torch kernels
    try:
        if lookup():
            return None
    except Exception:
        pass  # Triton's lookup failed: that is what this fixes
    folder = find_libcuda_dir()
    if folder is None:
        raise RuntimeError(f"{LIBCUDA} was found neither by `ldconfig -p` nor in {', '.join(LIBCUDA_CANDIDATES)}: "
                           "is a GPU attached and its driver installed? Set TRITON_LIBCUDA_PATH to its folder (without "
                           "it the Triton kernels fail to build and mixtral_nb runs its slower pure-torch path)")
    os.environ["TRITON_LIBCUDA_PATH"] = folder
    _prepend("LIBRARY_PATH", folder)
    if os.path.isdir(CUDA_STUBS):
        os.environ["LIBRARY_PATH"] += ":" + CUDA_STUBS  # after the real driver: only for linking old Triton
    for fn in (lookup, getattr(sys.modules.get(lookup.__module__), "library_dirs", None)):
        clear = getattr(fn, "cache_clear", None)
        if clear is not None:
            clear()
    return folder


# ------------------------------------------------------------------------------- notebook defaults


@dataclass
class NotebookSettings:
    """What a notebook's parameters cell resolves to on this machine."""

    model: str  # the Mixtral repo id, "embedded", or a folder
    device: torch.device
    max_new_tokens: int
    token: str | None = field(default=None, repr=False)  # a secret: never shown (see __repr__)
    device_given: bool = False  # DEVICE was set: plan for that GPU only, not all of them

    def __repr__(self) -> str:
        """Displaying the settings in a notebook must not save the Hugging Face token into it."""
        return (f"NotebookSettings(model={self.model!r}, device={self.device!r}, max_new_tokens={self.max_new_tokens!r}, "
                f"token={mask_secret(self.token)}, device_given={self.device_given!r})")

    __str__ = __repr__

    @property
    def embedded(self) -> bool:
        return self.model == EMBEDDED

    def describe(self) -> str:
        what = ("the embedded SmolLM2-based Mixtral (small, offline)" if self.embedded else self.model)
        return f"model: {what}\ndevice: {self.device}\nmax_new_tokens: {self.max_new_tokens}"


def mask_secret(secret: str | None) -> str:
    """What a repr or log line shows for a token: whether one is set, never any of its characters."""
    return "None" if secret is None else "'***'"


def notebook_settings(model: str = "auto", device: str | torch.device | None = None, max_new_tokens: int | None = None,
                      token: str | None = None) -> NotebookSettings:
    """Resolve a notebook's parameters: "auto" is Mixtral-8x7B-Instruct on a CUDA GPU, the embedded model on CPU.

    ``max_new_tokens=None`` gives long replies on a GPU and a few words on CPU (where the point is
    that every stage runs). ``token`` is optional: the Mixtral tokenizer ships with mistral-common
    and the pre-quantized repo is public; ``HF_TOKEN`` from the environment is used when set.
    """
    dev = parse_devices(device)[0] if device is not None else default_device()  # a bad name: one clear ValueError
    name = EMBEDDED if model == "auto" and dev.type != "cuda" else resolve(model)
    if max_new_tokens is None:
        max_new_tokens = GPU_MAX_NEW_TOKENS if dev.type == "cuda" else CPU_MAX_NEW_TOKENS
    return NotebookSettings(name, dev, int(max_new_tokens), token or os.environ.get("HF_TOKEN") or None,
                            device_given=device is not None)


def prepare_model(settings: NotebookSettings) -> Path:
    """Get the model's files ready: download the pre-quantized repo (with its free-disk check), or
    build the embedded model (first run ~1 min on CPU, then cached). Returns the folder."""
    if settings.model == EMBEDDED:
        return embedded_checkpoint(progress=True)
    folder = Path(settings.model)
    if folder.exists():
        return folder
    return download(settings.model, cache_root() / "hub" / settings.model.replace("/", "--"), token=settings.token)


def memory_plan(settings: NotebookSettings, preset: str | None = None, offload_per_layer: int | None = None,
                context: int = 4096, show_cache_on_cpu: bool = False) -> Any:
    """The planner's OffloadConfig for this machine and model (``mixtral_nb.planner``).

    Mixtral on a GPU: the plan for the free VRAM and available RAM here, or for a named machine in
    ``planner.PRESETS`` (e.g. "colab-t4"). The embedded model: the same planner, fed the embedded
    model's sizes. ``offload_per_layer`` overrides the planner's choice (e.g. 4 on CPU, to watch
    the expert cache miss). ``show_cache_on_cpu``: on CPU, with ``offload_per_layer`` None, offload
    half of each layer's experts, since there every expert fits and the cache would never miss.
    """
    if preset is not None:
        p = planner.preset(preset, context=context)
    else:
        kw: dict[str, Any] = {"context": context}
        if settings.embedded or Path(settings.model).exists():
            folder = build_embedded() if settings.embedded else Path(settings.model)
            kw["model"] = load_config(folder)
            if settings.embedded:
                kw["quant"] = embedded_quant_config()
        if settings.device.type != "cuda":
            where: Any = "cpu"
        else:  # DEVICE unset: every GPU (Kaggle's 2 x T4 split the layers and keep every expert resident)
            where = settings.device if settings.device_given else None
        p = planner.detect(where, **kw)
    if offload_per_layer is None and show_cache_on_cpu and settings.device.type == "cpu":
        offload_per_layer = p.sizes.num_experts // 2
    if offload_per_layer is not None and offload_per_layer != p.offload_per_layer:
        E = p.sizes.num_experts
        check_int(offload_per_layer, "offload_per_layer", 0, E - 1, why=f" (a layer of {E} experts keeps one on the GPU)")
        p = dataclasses.replace(p, offload_per_layer=offload_per_layer, buffer_size=max(p.buffer_size, 2),
                                prefetch=max(p.prefetch, 1) if offload_per_layer else 0,
                                host_mirror=bool(offload_per_layer),
                                notes=[*p.notes, f"offload_per_layer={offload_per_layer} set by hand"])
    return p


def describe_folder(folder: str | os.PathLike) -> str:
    """What a model folder holds: its layout (project, the article's pre-quantized files, original), files, size."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    layout = detect_layout(folder)
    what = {"project": "mixtral_nb checkpoint (quantized experts as one blob each, ready to load)",
            "article": "the article's pre-quantized checkpoint (converted once, losslessly, when first loaded)",
            "hf": "original floating-point checkpoint (quantized when loaded)"}.get(layout, layout)
    return f"{folder}\n  {what}\n  {len(files)} files, {size / 1e9:.2f} GB"


def model_summary(model: Any) -> str:
    """One paragraph on a model built by ``build_model``: layers, experts, where the expert cache lives."""
    cfg = model.config
    cache = getattr(model, "expert_cache", None)
    lines = [f"{type(model).__name__}: {cfg.num_hidden_layers} layers x {cfg.num_local_experts} experts "
             f"(top-{cfg.num_experts_per_tok}), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, dtype {model.dtype}"]
    if cache is not None:
        lines.append(f"expert cache on {cache.device}: {cache.slots} of {cache.E} experts per layer resident, "
                     f"{cache.config.buffer_size} spare buffers, blob {cache.blob_bytes / 1e6:.1f} MB; "
                     f"{cache.gpu_bytes / GiB:.2f} GiB in slots, {cache.host_bytes / GiB:.2f} GiB in host buffers"
                     + (" (host mirror)" if cache.mirror else ""))
    return "\n".join(lines)
