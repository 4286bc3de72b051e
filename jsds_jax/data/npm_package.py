"""Fetching an npm package's tarball with `npm pack` and reading files out of it.

`npm pack <name>@<version>` downloads the registry's .tgz into the working folder without
installing anything (no node_modules, no scripts run), so it needs only npm and the registry.
The tarball's files sit under "package/"; `read_files` returns the wanted ones by their path
below that folder, in memory (the largest set used here, openmoji's SVGs, is ~40 MB).
"""

from collections.abc import Callable
import os
import pathlib
import shutil
import subprocess
import tarfile


class PackageError(RuntimeError):
  """A package could not be downloaded or read; the message says what to do."""


def tarball_name(spec: str) -> str:
  """The file `npm pack` writes for "name@version": "@mdi/svg@7.4.47" -> mdi-svg-7.4.47.tgz."""
  name, _, version = spec.rpartition("@")
  if not name or not version:
    raise ValueError(f"npm package spec {spec!r} must be name@version")
  return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def download_tarball(spec: str, download_dir: str | os.PathLike) -> pathlib.Path:
  """Returns the package's .tgz in `download_dir`, running `npm pack spec` if it is absent."""
  folder = pathlib.Path(download_dir)
  target = folder / tarball_name(spec)
  if target.is_file():
    return target
  if shutil.which("npm") is None:
    raise PackageError(
        f"npm is not installed, so {spec} cannot be fetched. Install Node.js/npm, or run "
        f"`npm pack {spec}` on a machine that has it and put {target.name} into {folder}.")
  # A private folder, moved in when complete: an interrupted download leaves no partial .tgz.
  partial = folder / f".partial-{os.getpid()}"
  partial.mkdir(parents=True, exist_ok=True)
  try:
    result = subprocess.run(["npm", "pack", spec, "--silent"], cwd=partial,
                            capture_output=True, text=True, check=False)
    made = partial / target.name
    if result.returncode != 0 or not made.is_file():
      output = (result.stderr or result.stdout).strip()[-800:]
      raise PackageError(
          f"`npm pack {spec}` failed (exit {result.returncode}): {output} -- check that the "
          f"npm registry is reachable, or put {target.name} into {folder}.")
    os.replace(made, target)
    return target
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def read_files(tarball: str | os.PathLike,
               wanted: Callable[[str], bool]) -> dict[str, bytes]:
  """{path below "package/": contents} of the regular files in `tarball` that `wanted` takes."""
  files = {}
  try:
    with tarfile.open(tarball, mode="r:gz") as tar:
      for member in tar:
        name = member.name.removeprefix("./")
        if not member.isfile() or not name.startswith("package/"):
          continue
        path = name.removeprefix("package/").removeprefix("./")
        if ".." in pathlib.PurePosixPath(path).parts or not wanted(path):
          continue
        files[path] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise PackageError(f"{tarball} is not a readable npm tarball ({e}); delete it so that it "
                       "is downloaded again") from e
  return files
