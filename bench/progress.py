"""Progress on stderr: tqdm on a terminal when installed, else a plain counter (one line per step off a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():  # off a terminal (CI logs) one plain line per step reads better
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="cfg", dynamic_ncols=True,
                                mininterval=1.0)
            except Exception:
                self.bar = None

    def update(self, label: str):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.time() - self.t0:5.0f}s {label}")
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
