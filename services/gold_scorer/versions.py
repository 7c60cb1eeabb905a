"""Which model version a score must come from: a ModelRef's version, and what scorer.models_file names."""

from __future__ import annotations

from pathlib import Path

from synpref.shared.config import ModelRef, ScorerSettings


def model_version(ref: ModelRef) -> str:
    """The checkpoint's version: `ref.version`, else the folder name, else the path."""
    return ref.version or Path(ref.path.rstrip("/")).name or ref.path


class ExpectedVersions:
    """The version scorer.models_file names for each served model, re-read when the file changes (its mtime or
    size); None for a model it does not name, or while the file is missing or does not parse."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._versions: dict[str, str] = {}

    @classmethod
    def from_settings(cls, scorer: ScorerSettings) -> ExpectedVersions | None:
        path = scorer.models_file_path()
        return cls(path) if path is not None else None

    def __call__(self, model_name: str) -> str | None:
        import yaml

        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = yaml.safe_load(self.path.read_bytes()) or {}
                self._versions = {str(k): model_version(ModelRef.model_validate(v)) for k, v in data.items()}
                self._stamp = stamp
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            self._stamp, self._versions = None, {}  # the scorers ignore such a file too
        return self._versions.get(model_name)
