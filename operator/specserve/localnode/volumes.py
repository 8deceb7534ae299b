"""Volumes on the host: ConfigMap volumes written like the kubelet does, emptyDir as a dir.

ConfigMap layout (what the engine's file watcher sees in a real pod):
    <dir>/..2026_11_29_03_00_00.123456789/<key>     the payload of one version
    <dir>/..data -> ..2026_11_29_...                 swapped atomically (rename of a symlink)
    <dir>/<key>  -> ..data/<key>                     stable user-visible names
An update writes a new timestamped dir, swaps `..data`, then removes the old dir; a reader that
opens `<dir>/<key>` always sees one complete version.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from specserve.localnode.env import UnsupportedPodError

DATA_LINK = "..data"


def configmap_files(volume: Mapping[str, Any], data: Mapping[str, str]) -> dict[str, str]:
    """Relative path → content, honouring `items` (key → path) when given."""
    cm = volume["configMap"]
    items = cm.get("items")
    if not items:
        return dict(data)
    out: dict[str, str] = {}
    for item in items:
        if item["key"] not in data:
            if cm.get("optional"):
                continue
            raise UnsupportedPodError(
                f"volumes[{volume['name']}].configMap.items: key {item['key']!r} not in "
                f"ConfigMap {cm['name']}"
            )
        out[item["path"]] = data[item["key"]]
    return out


def write_atomic_dir(target: Path, files: Mapping[str, str]) -> bool:
    """Materialise `files` under `target` kubelet-style; returns False when nothing changed."""
    target.mkdir(parents=True, exist_ok=True)
    link = target / DATA_LINK
    if link.is_symlink() and _same_payload(link, files):
        return False
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    new_dir = target / f"..{stamp}"
    new_dir.mkdir()
    for rel, content in files.items():
        _check_rel(rel)
        p = new_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    old = os.readlink(link) if link.is_symlink() else None
    tmp_link = target / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(new_dir.name)
    os.replace(tmp_link, link)  # the atomic swap
    for rel in files:
        top = rel.split("/", 1)[0]
        user = target / top
        if not user.is_symlink():
            user.symlink_to(f"{DATA_LINK}/{top}")
    tops = {rel.split("/", 1)[0] for rel in files}
    for entry in target.iterdir():  # keys that disappeared
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in tops:
            entry.unlink()
    if old and old != new_dir.name:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def _check_rel(rel: str) -> None:
    parts = Path(rel).parts
    if not rel or rel.startswith("/") or ".." in parts or rel.startswith(".."):
        raise UnsupportedPodError(f"configMap item path {rel!r} must be relative without '..'")


def _same_payload(link: Path, files: Mapping[str, str]) -> bool:
    current = link.resolve()
    existing = {str(p.relative_to(current)): p for p in current.rglob("*") if p.is_file()}
    if set(existing) != set(files):
        return False
    return all(existing[k].read_text() == v for k, v in files.items())
