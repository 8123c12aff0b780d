"""What a workdir records about its run: one run at a time (a lock file) and its config (config.json).

  with workdir.lock(path):                      # <path>/lock holds {"host", "pid"}; stale ones recovered
    recorded = workdir.read_config(path)        # None for a new run
    workdir.check_model_unchanged(recorded, config, allow=("attention_impl",))
    workdir.write_config(path, config)          # <path>/config.json: {"code_version", "config"}

A resumed or evaluated run must use the model it was trained with: `check_model_unchanged` lists
every differing `model.*` field. Fields named in `allow` may differ when they leave the parameters'
shapes unchanged (a kernel, the compute dtype, the window); the caller checks the shapes.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import subprocess

import ml_collections

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
CONFIG_FILE = "config.json"


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run (locked by another run, or a different model)."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir's lock."""


class ConfigMismatchError(WorkdirError):
  """The config asked for differs from the one the workdir's run was trained with."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool = True):
  """Holds <workdir>/lock for the block: one run per workdir.

  Raises WorkdirLockedError naming the holder's host and pid when a live process holds it. A lock
  left by a dead process on this host (a crash, SIGKILL) is taken over with a warning; one from
  another host cannot be checked and is reported (delete the file if that run is gone).
  enabled=False (non-primary processes of a multi-host job) does nothing.
  """
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if holder is None:
        continue  # being written or just removed: look again
      if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
        log.warning("%s: taking over the lock of pid %s on %s, which is no longer running",
                    workdir, holder.get("pid"), holder.get("host"))
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      where = "this host" if holder.get("host") == me["host"] else f"host {holder.get('host')}"
      raise WorkdirLockedError(
          f"workdir {workdir} is in use by pid {holder.get('pid')} on {where} (since "
          f"{holder.get('started', '?')}; lock file {path}). Wait for that run to finish, or use "
          "another --workdir; delete the lock file only if that process is gone.")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise WorkdirLockedError(f"workdir {workdir}: could not take the lock file {path}")
  try:
    yield
  finally:
    if (_read_lock(path) or {}).get("pid") == me["pid"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, OSError):
    return {"host": "?", "pid": -1}  # unreadable: treated as another host's, reported


def code_version() -> str:
  """`git describe` of the source checkout when there is one, else the installed version."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                         capture_output=True, text=True, timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      return "git " + out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  from importlib import metadata
  try:
    return "mixtral_jax " + metadata.version("mixtral_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def _plain(config) -> dict:
  """The config as JSON values (tuples -> lists), comparable with what read_config returns."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.loads(json.dumps(d))


def write_config(workdir: str, config) -> str:
  """Writes <workdir>/config.json (atomically): the resolved config and the code version."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"code_version": code_version(), "config": _plain(config)}, f, indent=1,
              sort_keys=True)
  os.replace(tmp, path)
  return path


def _tuples(x):
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return x


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config recorded in <workdir>/config.json (lists back to tuples), or None if absent."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)["config"]))


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and not (prefix + k).endswith("tasks"):  # data.tasks is one value
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_diff(recorded, config, section: str = "model") -> dict[str, tuple]:
  """{'model.d_model': (recorded value, new value), ...} for every field of `section` that differs."""
  old = _flatten(_plain(recorded)[section], section + ".")
  new = _flatten(_plain(config)[section], section + ".")
  return {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
          for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")}


def normalize_fields(fields) -> tuple[str, ...]:
  """'attention_impl,model.window' or a sequence -> ('model.attention_impl', 'model.window')."""
  if isinstance(fields, str):
    fields = fields.split(",")
  out = []
  for f in fields or ():
    f = f.strip()
    if f:
      out.append(f if f.startswith("model.") else "model." + f)
  return tuple(out)


def check_model_unchanged(recorded, config, *, allow=(), workdir: str = "",
                          flag: str = "--allow_config_change") -> dict[str, tuple]:
  """Raises ConfigMismatchError listing the model fields that differ from the recorded run, unless
  every one is in `allow`. Returns the allowed differences (the caller checks parameter shapes)."""
  if recorded is None:
    return {}
  diff = config_diff(recorded, config)
  allow = set(normalize_fields(allow))
  refused = {k: v for k, v in diff.items() if k not in allow}
  if refused:
    lines = "\n".join(f"  {k}: {a!r} in the run, {b!r} now" for k, (a, b) in refused.items())
    raise ConfigMismatchError(
        f"workdir {workdir} was trained with a different model config ({CONFIG_FILE}); "
        f"differing fields:\n{lines}\nUse the run's config (evaluate needs only --workdir), a new "
        f"--workdir, or, for fields that leave the parameters' shapes unchanged (a kernel, dtype, "
        f"window, ...), {flag}=FIELD,...")
  return diff
