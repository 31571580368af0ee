"""Checkpoint folders: original HF folders, the article's pre-quantized files, the project format.

Modules (each imports only those listed before it): ``errors`` (CheckpointError & co), ``files``
(safetensors headers), ``structure`` (config and tensor validation), ``integrity`` (digests,
lock), ``layout`` (which kind of folder), ``hub`` (downloads), ``hf`` (original folders),
``project`` (the project format: read, write, verify), ``article`` (the article's layout and its
conversion), ``quantize`` (original -> project), ``resolve`` (any state_path -> opened checkpoint).
"""

from .article import ArticleCheckpoint, convert, converted_path, ensure_converted, is_article_folder
from .errors import FIX_FILE, CheckpointError, CorruptFileError, HubError, HubUnreachableError, NotEnoughDiskError, read_json
from .files import SafetensorsFiles, read_header
from .hf import HFCheckpoint, trunk_name
from .hub import check_disk, download
from .integrity import FolderLock
from .layout import detect_layout
from .project import FORMAT, VERSION, ProjectCheckpoint, Source, check_quant, write_project
from .quantize import QuantizedView, quantize
from .resolve import VerifyReport, open_checkpoint, resolve_checkpoint, verify
from .structure import ATTN, attn_key, attn_shapes, config_fingerprint, head_dim, layer_of, load_config

__all__ = ["ArticleCheckpoint", "convert", "converted_path", "ensure_converted", "is_article_folder", "FIX_FILE",
           "CheckpointError", "CorruptFileError", "HubError", "HubUnreachableError", "NotEnoughDiskError", "read_json",
           "SafetensorsFiles", "read_header", "HFCheckpoint", "trunk_name", "check_disk", "download", "FolderLock",
           "detect_layout", "FORMAT", "VERSION", "ProjectCheckpoint", "Source", "check_quant", "write_project",
           "QuantizedView", "quantize", "VerifyReport", "open_checkpoint", "resolve_checkpoint", "verify", "ATTN",
           "attn_key", "attn_shapes", "config_fingerprint", "head_dim", "layer_of", "load_config"]
