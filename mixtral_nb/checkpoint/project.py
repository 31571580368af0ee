"""The project format: reading (validated and checksummed) and writing (streamed, resumable, locked).

Layout (self-describing; loading needs no settings from code):

    config.json                    the HF config (MixtralConfig, or another family's)
    trunk.safetensors              everything but the experts, transformers-5 names; a quantized
                                   attention projection is stored as its segments, e.g.
                                   ``model.layers.3.self_attn.q_proj.q4`` / ``.scale_q`` / ...
    experts-LLL.safetensors        one uint8 tensor ``blobs`` [E, blob_bytes] per MoE layer: expert e's
                                   blob is row e, ready to copy into a pinned or GPU slot as is
    manifest.json                  format version, quant settings, expert blob layout, attention
                                   specs, file sizes, file digests (``hashes``), per-expert blob
                                   digests (``blob_hashes``), the read-time sums (``read_sums``),
                                   where it came from
    COMPLETE                       written last; holds the digest of manifest.json
    progress.json                  the settings and source fingerprint the folder is being written with
    VERIFIED                       the stat keys of the files when their digests were last checked

Writing is streamed and resumable: each layer's experts and its trunk tensors (attention, norms,
router) are written as soon as they are ready (``parts/layer-LLL.safetensors`` holds the latter
until the end, when the parts are merged into ``trunk.safetensors``), every file goes to a
temporary name and is renamed, and ``COMPLETE`` is written last. So a folder without ``COMPLETE``
is never taken for a finished checkpoint, and a rerun with the same settings and the same source
content skips finished layers. One writer at a time: a lock file (:class:`.integrity.FolderLock`).

Integrity: every file's digest (:mod:`.integrity`) is recorded in the manifest, and the manifest's
in ``COMPLETE``. The first open after writing checks config.json and the expert files' headers at
once, and the trunk and each expert blob against read-time sums as a load reads them, in a thread
beside it (a load reads every blob once, so this costs no second read of the 10+ GB of experts;
build_model raises before it returns a model); a corrupt file is a
:class:`CorruptFileError` naming it and, for an expert file, the experts. Once every blob has been
read and found good, ``VERIFIED`` records the files' stat keys, so later opens skip the checks until
a file changes. ``verify`` (and folders without read-time sums) hash every file with blake2b.
Folders written before digests existed get them computed and recorded on first open, with a note.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..expert import ExpertFormat
from ..quant import QSpec
from .errors import CheckpointError, CorruptFileError, read_json
from .files import SafetensorsFiles
from .hub import check_disk
from ..families import family_of, skeleton
from .integrity import (ALGO, FAST_ALGO, DigestRun, FolderLock, atomic_text, blob_digest, bytes_digest, digest_files,
                        fast_digest, fast_file_digest, header_digest, stat_key)
from .structure import load_config

FORMAT = "mixtral_nb"
VERSION = 1
FIX_PROJECT = ("re-create it (quantize(..., overwrite=True) for a quantized folder; delete it and load the article's "
               "folder again for a converted one)")


def same_quant(given: dict[str, Any] | None, have: dict[str, Any] | None) -> bool:
    """Bits and group size decide what the files hold; the axis is a storage detail the manifest records
    (hqq 0.2.8's BaseQuantizeConfig defaults to axis 1, the article's files are axis 0)."""
    if given is None or have is None:
        return given is have
    return all(given[k] == have[k] for k in ("nbits", "group_size"))


def _describe(p: dict[str, Any] | None) -> str:
    return "floating point" if p is None else f"{p['nbits']}-bit group {p['group_size']}"


def check_quant(have: QuantConfig, given: QuantConfig | None, where: Path) -> None:
    """Refuse a quant_config that disagrees with what a folder's files hold (None accepts the files')."""
    if given is None:
        return
    for part in ("ffn", "attn"):
        g, h = getattr(given, part), getattr(have, part)
        if not same_quant(g, h):
            what = "experts" if part == "ffn" else "attention"
            raise CheckpointError(
                f"{where} holds {_describe(h)} {what}, but quant_config asks for {_describe(g)}: pass "
                f"quant_config=None to use the checkpoint's settings, or quantize the original model again"
            )


def expert_file(layer: int) -> str:
    return f"experts-{layer:03d}.safetensors"


def _str_dict(v: Any, value_types: tuple[type, ...]) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and type(x) in value_types for k, x in v.items())


class ProjectCheckpoint:
    """A folder written by :func:`write_project`, validated (and checksummed) on open; see the module docstring.

    ``verify``: None checks the digests unless ``VERIFIED`` says the files are unchanged since the last
    check; True always checks; False skips the digests (structure is always checked).
    """

    kind = "project"

    def __init__(self, folder: Path, verify: bool | None = None) -> None:
        self.folder = folder = Path(folder)
        self.pending: dict[str, set[int]] = {}  # expert blobs still to check as they are read (module docstring)
        self._checks: _ReadChecks | None = None
        if not (folder / "COMPLETE").is_file():
            raise CheckpointError(
                f"{folder} is an unfinished mixtral_nb checkpoint (no COMPLETE marker): rerun quantize() with the "
                "same arguments to finish it"
            )
        self.manifest = m = self._read_manifest()
        for name, size in m["files"].items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; {FIX_PROJECT}")
            if path.stat().st_size != size:
                raise CheckpointError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {size}: truncated or corrupt; {FIX_PROJECT}"
                )
        self.config = load_config(folder)
        self.files = SafetensorsFiles(folder)
        try:
            self.quant = QuantConfig.from_json(m["quant"])
            self.fmt = ExpertFormat.from_json(m["expert_format"])
            self.attn_specs: dict[str, dict[str, Any]] = m["attn_specs"]  # QSpec fields, as build_model reads them
            specs = {k: QSpec(**v) for k, v in self.attn_specs.items()}
            self._check_files(specs)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise CheckpointError(f"{folder / 'manifest.json'} is malformed ({e!r}): {FIX_PROJECT}") from None
        if verify is not False:
            self._verify(force=bool(verify))

    def _read_manifest(self) -> dict[str, Any]:
        path = self.folder / "manifest.json"
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise CheckpointError(f"{path} is missing: {FIX_PROJECT}") from None
        try:
            done = (self.folder / "COMPLETE").read_text()
        except (OSError, UnicodeDecodeError):
            raise CheckpointError(f"{self.folder / 'COMPLETE'} is unreadable: {FIX_PROJECT}") from None
        if done.strip() != "ok":  # "ok": written before COMPLETE held the manifest's digest
            try:
                want = json.loads(done)["manifest"]
            except (ValueError, KeyError, TypeError):
                raise CorruptFileError(f"{self.folder / 'COMPLETE'} is corrupt: {FIX_PROJECT}") from None
            if want != bytes_digest(raw):
                raise CorruptFileError(f"{path} does not match the digest recorded in COMPLETE: it was edited or is "
                                       f"corrupt; {FIX_PROJECT}")
        m = read_json(path)
        for key in ("format", "version", "quant", "expert_format", "attn_specs", "files"):
            if key not in m:
                raise CheckpointError(f"{path} has no '{key}' field: re-create the checkpoint with quantize(..., "
                                      "overwrite=True)")
        if m["format"] != FORMAT:
            raise CheckpointError(f"{path} is not a mixtral_nb manifest (format={m['format']!r})")
        if type(m["version"]) is not int or m["version"] < 1:
            raise CheckpointError(f"{path} has version {m['version']!r}, not a format version: {FIX_PROJECT}")
        if m["version"] > VERSION:
            raise CheckpointError(f"{self.folder} uses format version {m['version']}; upgrade mixtral_nb (pip install -U)")
        if not _str_dict(m["files"], (int,)) or not m["files"] or any(
                v < 0 or "/" in k or k.startswith(".") for k, v in m["files"].items()):
            raise CheckpointError(f"{path}: 'files' is not a map of file names to sizes: {FIX_PROJECT}")
        for key in ("quant", "expert_format", "attn_specs"):
            if not isinstance(m[key], dict):
                raise CheckpointError(f"{path}: '{key}' is not an object: {FIX_PROJECT}")
        if "hashes" in m and not (_str_dict(m["hashes"], (str,)) and set(m["hashes"]) <= set(m["files"]) | {"config.json"}):
            raise CheckpointError(f"{path}: 'hashes' is not a map of the manifest's files to digests: {FIX_PROJECT}")
        if "blob_hashes" in m and not (isinstance(m["blob_hashes"], dict) and all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in m["blob_hashes"].values())):
            raise CheckpointError(f"{path}: 'blob_hashes' is malformed: {FIX_PROJECT}")
        if "read_sums" in m and not _read_sums_ok(m["read_sums"]):
            raise CheckpointError(f"{path}: 'read_sums' is malformed: {FIX_PROJECT}")
        return m

    def _check_files(self, attn_specs: dict[str, QSpec]) -> None:
        """Headers against the manifest: expert blobs and attention segments have the shapes it promises."""
        c = self.config
        sk = skeleton(c)
        bases = set(sk.attn_linears(family_of(c)))
        if (self.quant.ffn is None) != (self.fmt.specs is None) or set(attn_specs) != (
                set() if self.quant.attn is None else bases):
            raise CheckpointError(f"{self.folder / 'manifest.json'}: its quant settings, expert format and attention "
                                  f"specs disagree: {FIX_PROJECT}")
        if (self.fmt.hidden, self.fmt.intermediate) != (sk.hidden, sk.intermediate):
            raise CheckpointError(f"{self.folder / 'manifest.json'}: expert shapes disagree with config.json; {FIX_PROJECT}")
        blob = [sk.num_experts, self.fmt.layout.total_bytes]
        names = {"trunk.safetensors", *(expert_file(i) for i in sk.moe_layers)}
        if names - set(self.manifest["files"]):
            raise CheckpointError(f"{self.folder / 'manifest.json'} does not list {sorted(names - set(self.manifest['files']))}"
                                  f": the manifest and config.json disagree; {FIX_PROJECT}")
        for layer in sk.moe_layers:
            name = expert_file(layer)
            info = self.files.header(name).get("blobs")
            if info is None or info["dtype"] != "U8" or info["shape"] != blob:
                got = None if info is None else (info["dtype"], info["shape"])
                raise CheckpointError(f"{self.folder / name} holds {got}, the manifest's quant settings need uint8 "
                                      f"{blob}: the files and manifest.json disagree; {FIX_PROJECT}")
        trunk = self.files.header("trunk.safetensors")
        for base, spec in attn_specs.items():
            for seg in spec.layout().segments:
                info = trunk.get(f"{base}.{seg.name}")
                if info is None or tuple(info["shape"]) != seg.shape:
                    raise CheckpointError(
                        f"{self.folder / 'trunk.safetensors'}: {base}.{seg.name} is {None if info is None else info['shape']}"
                        f", the manifest's attention settings need {seg.shape}: {FIX_PROJECT}"
                    )

    # integrity -------------------------------------------------------------------------------

    def _marker(self) -> dict[str, Any]:
        raw = (self.folder / "manifest.json").read_bytes()
        names = sorted(self.manifest.get("hashes", {}))
        return {"algo": ALGO, "manifest": bytes_digest(raw), "files": {n: stat_key(self.folder / n) for n in names}}

    def _verify(self, force: bool) -> None:
        hashes = self.manifest.get("hashes")
        if hashes is None:
            self._record_hashes()
            return
        marker = self.folder / "VERIFIED"
        if not force:
            try:
                if json.loads(marker.read_text()) == self._marker():
                    return
            except (OSError, ValueError):
                pass
        sums = self.manifest.get("read_sums")
        if isinstance(sums, dict) and sums.get("algo") == FAST_ALGO:
            self._verify_while_reading(sums)
            return
        run = self.check_digests()
        bad = [n for n, d in run.digests.items() if d != hashes[n]]
        if bad:
            raise CorruptFileError(self.corrupt_message(bad))
        self._mark_verified()

    def _mark_verified(self) -> None:
        try:
            atomic_text(json.dumps(self._marker()), self.folder / "VERIFIED")
        except OSError:
            pass  # a read-only folder is checked on every open

    def _verify_while_reading(self, sums: dict[str, Any]) -> None:
        """Check the small files and the trunk now, and arm the check of each expert blob as it is read."""
        E = skeleton(self.config).num_experts
        experts = sorted(n for n in self.manifest["files"] if n.startswith("experts-"))
        if set(sums["blobs"]) != set(experts) or set(sums["headers"]) != set(experts) or any(
                len(sums["blobs"][n]) != E for n in experts) or "trunk.safetensors" not in sums["files"]:
            raise CheckpointError(f"{self.folder / 'manifest.json'}: 'read_sums' does not cover the checkpoint's files: "
                                  f"{FIX_PROJECT}")
        bad = [n for n in ("config.json",) if n in self.manifest["hashes"]
               and digest_files(self.folder, [n]).digests[n] != self.manifest["hashes"][n]]
        bad += [n for n in experts if header_digest(self.folder / n) != sums["headers"][n]]
        if bad:
            raise CorruptFileError(self._corrupt_text([f"{self.folder / n}" + (" (its header)" if n in experts else "")
                                                       for n in bad]))
        self.pending = {n: set(range(E)) for n in experts}
        self._checks = _ReadChecks(self._corrupt_text)
        for n, want in sorted(sums["files"].items()):  # the trunk: summed while the build reads it
            self._checks.submit(str(self.folder / n), fast_file_digest, self.folder / n, want=want)

    def _check_blob(self, name: str, e: int, blob: Tensor) -> None:
        todo = self.pending.get(name)
        if todo is None or e not in todo or self._checks is None:
            return
        self._checks.submit(f"{self.folder / name} (experts [{e}])", fast_digest, blob,
                            want=self.manifest["read_sums"]["blobs"][name][e])
        todo.discard(e)
        if not todo:
            del self.pending[name]
            if not self.pending:  # the last blob was read: every check must pass before the load returns
                self._checks.drain()
                self._checks = None
                self._mark_verified()

    def check_digests(self) -> DigestRun:
        """Hash every file the manifest has a digest for (the explicit check behind :func:`verify`)."""
        return digest_files(self.folder, sorted(self.manifest.get("hashes", {})))

    def corrupt_message(self, bad: list[str]) -> str:
        """The error for files whose digests differ: names them and, for expert files, the experts."""
        parts = []
        for name in bad:
            detail = ""
            want = self.manifest.get("blob_hashes", {}).get(name)
            if want is not None:
                try:
                    blobs = self.files.tensor(name, "blobs")
                    experts = [e for e in range(blobs.shape[0]) if e >= len(want) or blob_digest(blobs[e]) != want[e]]
                    detail = f" (experts {experts})" if experts else " (its header)"
                except CheckpointError:
                    detail = " (its header)"
                finally:
                    self.files.close()
            parts.append(f"{self.folder / name}{detail}")
        return self._corrupt_text(parts)

    @staticmethod
    def _corrupt_text(parts: list[str]) -> str:
        return (f"{', '.join(parts)} {'does' if len(parts) == 1 else 'do'} not match the digest recorded when the "
                f"checkpoint was written: the file is corrupt (disk or copy error); {FIX_PROJECT}, or copy the files "
                "again")

    def _record_hashes(self) -> None:
        """A folder from before digests existed: compute and record them (later opens verify against them)."""
        names = ["config.json", *sorted(self.manifest["files"])]
        print(f"mixtral_nb: {self.folder} has no checksums (written by an earlier version); recording them now, "
              "later loads verify against them")
        run = digest_files(self.folder, names)
        m = {**self.manifest, "hashes": run.digests, "hash_algo": ALGO}
        text = json.dumps(m, indent=1)
        try:
            atomic_text(text, self.folder / "manifest.json")
            atomic_text(json.dumps({"manifest": bytes_digest(text.encode())}), self.folder / "COMPLETE")
            self.manifest = m
            atomic_text(json.dumps(self._marker()), self.folder / "VERIFIED")
        except OSError:
            pass  # read-only: nothing recorded; the structure checks still ran

    # reading ---------------------------------------------------------------------------------

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.files.header("trunk.safetensors"):
            yield key, self.files.tensor("trunk.safetensors", key)
        if self._checks is not None:  # a corrupt trunk stops the load before the experts are read
            self._checks.drain()

    def blob(self, layer: int, e: int) -> Tensor:
        """One expert's blob (a copy); only the current layer's file stays mapped."""
        name = expert_file(layer)
        self.files.keep_only({name})
        blob = self.files.slice(name, "blobs")[e]
        self._check_blob(name, e, blob)
        return blob


class _ReadChecks:
    """Read-time sums computed in a thread beside the reader (torch's sums release the GIL), so a
    first load spends little more than it would without them. At most two checks wait at a time
    (each holds a blob's copy); a failed one raises at the next submit or drain, so before the
    load returns."""

    def __init__(self, corrupt_text: Callable[[list[str]], str]) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mixtral_nb-read-sums")
        self.queue: deque[tuple[str, Future, str]] = deque()
        self.corrupt_text = corrupt_text

    def _pop(self) -> None:
        label, fut, want = self.queue.popleft()
        if fut.result() != want:
            self.queue.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise CorruptFileError(self.corrupt_text([label]))

    def submit(self, label: str, fn: Callable[..., str], *args: Any, want: str) -> None:
        while self.queue and (self.queue[0][1].done() or len(self.queue) >= 2):
            self._pop()
        self.queue.append((label, self.pool.submit(fn, *args), want))

    def drain(self) -> None:
        while self.queue:
            self._pop()


# ---------------------------------------------------------------------------------------------
# writing


# what a model folder ships beside its weights so that a tokenizer and its chat template load from it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class Source(Protocol):
    """What :func:`write_project` reads: tensors already in project names and encodings, layer by layer."""

    config: Any

    def layer_tensors(self, layer: int) -> dict[str, Tensor]: ...  # attention, norms, router of one layer
    def expert_blob(self, layer: int, e: int) -> Tensor: ...  # one expert's blob, uint8 [blob_bytes]
    def global_tensors(self) -> dict[str, Tensor]: ...  # embeddings, final norm, lm_head
    def close(self) -> None: ...  # unmap the files read so far


OURS = ("progress.json", "manifest.json", "COMPLETE", "VERIFIED", "config.json", "trunk.safetensors", "parts",
        "source-memo.json")


def ours(path: Path) -> bool:
    """A file this module writes into a project folder (what overwrite=True removes)."""
    n = path.name
    return n in OURS or n.endswith(".tmp") or bool(re.fullmatch(r"experts-\d{3}\.safetensors", n))


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    if {k: v for k, v in old.items() if k != "source"} == {k: v for k, v in new.items() if k != "source"}:
        a, b = old.get("source") or {}, new.get("source") or {}
        files = a.get("files", {}) if isinstance(a, dict) else {}
        changed = sorted(n for n in set(files) | set(b.get("files", {})) if files.get(n) != b.get("files", {}).get(n))
        return (f"the source's content changed since this folder was started (files {changed[:4]} differ); resuming "
                "would mix layers of two different models")
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "different settings (" + "; ".join(f"{k}: folder has {old.get(k)}, asked for {new.get(k)}" for k in diff) + ")"


class Writer:
    """The resumable, never-complete-early side of a project folder (see the module docstring).

    Call :meth:`open` with the folder's lock held.
    """

    def __init__(self, dst: Path, settings: dict[str, Any], overwrite: bool) -> None:
        self.dst, self.settings, self.overwrite = dst, settings, overwrite

    def open(self) -> None:
        dst, settings = self.dst, self.settings
        prog = dst / "progress.json"
        existing = [p for p in dst.iterdir() if ours(p)] if dst.is_dir() else []
        if existing and not self.overwrite:
            if not prog.exists():
                raise CheckpointError(f"{dst} already holds checkpoint files not written by this version (no "
                                      "progress.json): pass overwrite=True to start over, or choose another destination")
            old = read_json(prog)
            if old != settings:
                raise CheckpointError(f"{dst} was started with {_settings_diff(old, settings)}: pass overwrite=True "
                                      "to start over, or choose another destination")
        if self.overwrite:
            for p in existing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (dst / "parts").mkdir(parents=True, exist_ok=True)
        for p in list(dst.glob("*.tmp")) + list((dst / "parts").glob("*.tmp")):
            p.unlink()  # left by an interrupted write
        if not prog.exists():
            atomic_text(json.dumps(settings, indent=1, sort_keys=True), prog)

    @property
    def complete(self) -> bool:
        return (self.dst / "COMPLETE").exists()

    def layer_done(self, layer: int, moe: bool = True) -> bool:
        return (not moe or (self.dst / expert_file(layer)).exists()) and self._part(layer).exists()

    def _part(self, layer: int | None) -> Path:
        return self.dst / "parts" / ("globals.safetensors" if layer is None else f"layer-{layer:03d}.safetensors")

    def write_layer(self, layer: int, trunk_part: dict[str, Tensor], blobs: Tensor | None) -> None:
        _atomic_save(trunk_part, self._part(layer))
        if blobs is None:  # a dense layer (no routed experts)
            return
        digests = [blob_digest(b) for b in blobs]
        sums = [fast_digest(b) for b in blobs]
        # one metadata key: safetensors writes several in no fixed order, and a resumed folder must be
        # byte-identical to one written in one go
        _atomic_save({"blobs": blobs}, self.dst / expert_file(layer),
                     metadata={"blob_checks": json.dumps({"digests": digests, "sums": sums})})

    def globals_done(self) -> bool:
        return self._part(None).exists()

    def write_globals(self, tensors: dict[str, Tensor]) -> None:
        _atomic_save(tensors, self._part(None))

    def finish(self, config_json: str, manifest: dict[str, Any], num_layers: int,
               moe_layers: list[int] | None = None, tokenizer_from: Path | None = None) -> None:
        trunk: dict[str, Tensor] = {}
        for layer in [None, *range(num_layers)]:
            with safe_open(str(self._part(layer)), framework="pt", device="cpu") as f:
                for k in f.keys():
                    trunk[k] = f.get_tensor(k)
        _atomic_save(trunk, self.dst / "trunk.safetensors")
        del trunk
        atomic_text(config_json, self.dst / "config.json")
        for name in TOKENIZER_FILES if tokenizer_from is not None else ():  # before COMPLETE: a complete
            if (tokenizer_from / name).is_file():  # folder loads with its own tokenizer
                _atomic_copy(tokenizer_from / name, self.dst / name)
        blob_hashes, blob_sums = {}, {}
        for layer in (range(num_layers) if moe_layers is None else moe_layers):
            name = expert_file(layer)
            with safe_open(str(self.dst / name), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if "blob_checks" in meta:
                    checks = json.loads(meta["blob_checks"])
                    blob_hashes[name], blob_sums[name] = checks["digests"], checks["sums"]
                else:  # a layer written by a version without read-time sums (a resumed folder)
                    blob_hashes[name] = json.loads(meta.get("blob_digests", "[]"))
                    blob_sums[name] = [fast_digest(b) for b in f.get_tensor("blobs")]
        files = {p.name: p.stat().st_size for p in sorted(self.dst.glob("*.safetensors"))}
        run = digest_files(self.dst, ["config.json", *files])
        experts = sorted(blob_sums)
        read_sums = {"algo": FAST_ALGO, "files": {"trunk.safetensors": fast_file_digest(self.dst / "trunk.safetensors")},
                     "headers": {n: header_digest(self.dst / n) for n in experts}, "blobs": blob_sums}
        text = json.dumps({**manifest, "files": files, "hashes": run.digests, "hash_algo": ALGO,
                           "blob_hashes": blob_hashes, "read_sums": read_sums}, indent=1)
        atomic_text(text, self.dst / "manifest.json")
        atomic_text(json.dumps({"manifest": bytes_digest(text.encode())}), self.dst / "COMPLETE")
        shutil.rmtree(self.dst / "parts", ignore_errors=True)


def write_project(source: Source, dst: Path, *, quant: QuantConfig, fmt: ExpertFormat,
                  attn_specs: dict[str, QSpec], fingerprint: dict[str, Any], trunk_bytes: int,
                  overwrite: bool = False, progress: bool = True, desc: str = "experts",
                  on_layer: Callable[[int], None] | None = None, source_memo: dict[str, Any] | None = None,
                  tokenizer_from: Path | None = None) -> Path:
    """Stream a source into a project folder, layer by layer; resumable, locked and atomic (module docstring).

    ``tokenizer_from``: a folder whose tokenizer files (``TOKENIZER_FILES``) are copied in before the
    folder is marked complete, so ``load`` finds the model's own tokenizer and chat template there.

    ``on_layer(i)`` runs after layer i's files are written (progress hooks; tests use it to interrupt).
    ``source_memo`` (the stat-keyed digests of the source's files) is kept in the folder for the next resume.
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a folder: choose another destination")
    cfg = source.config
    sk = skeleton(cfg)
    L, E, moe = cfg.num_hidden_layers, sk.num_experts, set(sk.moe_layers)
    settings = {"format": FORMAT, "version": VERSION, "quant": quant.to_json(), "source": fingerprint}
    with FolderLock(dst, f"writing a mixtral_nb checkpoint from {fingerprint.get('kind', 'a source')}"):
        writer = Writer(dst, settings, overwrite)
        writer.open()
        if source_memo is not None:
            atomic_text(json.dumps(source_memo), dst / "source-memo.json")
        if writer.complete:
            return dst
        todo = [layer for layer in range(L) if not writer.layer_done(layer, layer in moe)]
        need = {expert_file(layer): E * fmt.layout.total_bytes for layer in todo if layer in moe}
        need["trunk (parts + merged)"] = 2 * trunk_bytes
        check_disk(need, dst)

        bar = tqdm(total=len(moe) * E, desc=desc, unit="expert", disable=not progress)
        bar.update(len(moe - set(todo)) * E)
        for layer in todo:
            part = source.layer_tensors(layer)
            blobs = torch.empty(E, fmt.layout.total_bytes, dtype=torch.uint8) if layer in moe else None
            for e in range(E if blobs is not None else 0):
                blobs[e] = source.expert_blob(layer, e)
                bar.update(1)
            writer.write_layer(layer, part, blobs)
            del part, blobs
            source.close()
            if on_layer is not None:
                on_layer(layer)
        bar.close()
        if not writer.globals_done():
            writer.write_globals(source.global_tensors())
            source.close()
        manifest = {"format": FORMAT, "version": VERSION, "quant": quant.to_json(), "expert_format": fmt.to_json(),
                    "attn_specs": {k: v.to_json() for k, v in attn_specs.items()}, "source": fingerprint}
        writer.finish(cfg.to_json_string(use_diff=True), manifest, L, sorted(moe), tokenizer_from)
    return dst


def _read_sums_ok(rs: Any) -> bool:
    """The shape of the manifest's ``read_sums`` (what a corrupt or hand-edited manifest may break)."""
    return (isinstance(rs, dict) and isinstance(rs.get("algo"), str) and _str_dict(rs.get("files"), (str,))
            and _str_dict(rs.get("headers"), (str,)) and isinstance(rs.get("blobs"), dict)
            and all(isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
                    for k, v in rs["blobs"].items()))
