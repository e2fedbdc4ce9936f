"""The model hub: presets and hub files, the models folder, checksums and downloads.

Typical use::

    preset = resolve_preset(preset_name, hub_file)          # a validated, frozen Preset
    paths = ensure_models(preset, resolve_models_dir(dir), offline=True)
"""

from hsf_bids.hub.cache import (
    MODELS_DIR_ENV,
    FileState,
    ModelsMissingError,
    ModelStatus,
    default_models_dir,
    ensure_models,
    fetch_command,
    model_path,
    resolve_models_dir,
    verify_models,
)
from hsf_bids.hub.download import (
    ChecksumError,
    DownloadError,
    ModelsError,
    download_file,
    xxh3_64_file,
)
from hsf_bids.hub.presets import (
    DEFAULT_LABELS,
    DEFAULT_MARGINS,
    DEFAULT_PRESET,
    HubError,
    HubNotFoundError,
    Label,
    Margins,
    ModelFile,
    Preset,
    UnknownPresetError,
    hub_subfolder,
    list_presets,
    load_hub,
    load_preset,
    resolve_preset,
)

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_MARGINS",
    "DEFAULT_PRESET",
    "MODELS_DIR_ENV",
    "ChecksumError",
    "DownloadError",
    "FileState",
    "HubError",
    "HubNotFoundError",
    "Label",
    "Margins",
    "ModelFile",
    "ModelStatus",
    "ModelsError",
    "ModelsMissingError",
    "Preset",
    "UnknownPresetError",
    "default_models_dir",
    "download_file",
    "ensure_models",
    "fetch_command",
    "hub_subfolder",
    "list_presets",
    "load_hub",
    "load_preset",
    "model_path",
    "resolve_models_dir",
    "resolve_preset",
    "verify_models",
    "xxh3_64_file",
]
