"""Loading the libraries' checkpoint files without running pickled code.

DeepSpeed (0.19.8) reads `*_model_states.pt` / `*_optim_states.pt` with `torch.load(weights_only=False)`, and
torch.distributed.checkpoint reads `.metadata` with `pickle.load` and non-tensor values with
`torch.load(weights_only=False)`: a planted file would run code. `weights_only_engine(engine)` swaps DeepSpeed's
checkpoint engine for one that loads with `weights_only=True` and allows only the few DeepSpeed classes its own
files contain; `SafeFileSystemReader` / `WeightsOnlyLoadPlanner` do the same for DCP. The manifest check
(`integrity.verify`) runs before either; these are the second line.
"""
from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta


def _deepspeed_globals() -> list:
    """The non-tensor classes in DeepSpeed's ZeRO-1/2/3 checkpoints (fp32, bf16 and fp16 loss scaling)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine; `load` refuses anything but tensors, containers and the classes above."""

    def __init__(self, inner):
        self._inner = inner
        self._allowed = _deepspeed_globals()

    def load(self, path, map_location=None):
        with torch.serialization.safe_globals(self._allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(f"{path}: refused to unpickle ({str(e).splitlines()[0]})") from e

    def __getattr__(self, name):
        return getattr(self._inner, name)


def weights_only_engine(engine) -> None:
    """Make `engine.load_checkpoint` read with weights_only=True."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)


_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses, sizes, dtypes and paths; any other global is refused."""

    def find_class(self, module, name):
        if name in _DCP_CLASSES.get(module, ()) or \
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(f"{path}: refused to unpickle ({e})") from e
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor values (optimizer hyper-parameters, step counters) with torch.save: read them
    weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # the helper the base class uses

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
