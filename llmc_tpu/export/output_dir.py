"""An output folder that appears complete or not at all.

Everything is written to a hidden sibling temp folder; ``commit`` renames it into
place. An existing folder is refused unless ``overwrite`` is asked for, and even
then it is only replaced once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmc_tpu.export.manifest import write_manifest


class OutputExistsError(FileExistsError):
    pass


class OutputDir:
    def __init__(self, final: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        self.final = Path(final).expanduser().resolve()
        self.overwrite = overwrite
        if self.final.exists() and not overwrite:
            raise OutputExistsError(
                f"save.save_path {str(self.final)!r} already exists; choose another path or pass --overwrite to replace it"
            )
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.final.parent, os.W_OK):
            raise PermissionError(f"save.save_path: cannot write in {self.final.parent}")
        # A fixed name, so that an interrupted run can be found and resumed (--resume).
        self.tmp = self.final.with_name(f".{self.final.name}.partial")
        self.resumed = self.tmp.exists()
        if self.resumed and not resume:
            raise OutputExistsError(f"an interrupted run left {self.tmp}; pass --resume to continue it, or delete it")
        self.tmp.mkdir(exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.tmp.joinpath(*parts)

    def commit(self) -> Path:
        """Write the checksum manifest and move the finished folder into place (replacing an old one only now, when asked to)."""
        write_manifest(self.tmp)
        old = None
        if self.final.exists():
            if not self.overwrite:
                raise OutputExistsError(f"{self.final} appeared while the run was going on; the result is kept in {self.tmp}")
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
