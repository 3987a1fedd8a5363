"""AppImages: finding the squashfs after the ELF part, mounting it, running it from a profile."""

import json
import os
import shutil
import subprocess

import pytest

from bbld.engine import squashfs
from bbld.engine.errors import StartError
from tests.conftest import app_layer, layer, processes_with, run_sandbox, sandbox, wait_gone

STUB = "/usr/bin/true"  # any ELF file whose section headers end it, as an AppImage runtime's


def fuse_usable() -> bool:
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError:
        return False
    return shutil.which("squashfuse") is not None and shutil.which("mksquashfs") is not None


needs_fuse = pytest.mark.skipif(not fuse_usable(), reason="needs a usable /dev/fuse (0666; "
                                "tests/run.sh sets it as root), squashfuse and mksquashfs")


def make_appimage(tmp_path, marker: str = "") -> str:
    """A synthetic AppImage: an ELF stub, then a squashfs holding AppRun."""
    tree = tmp_path / "AppDir"
    tree.mkdir()
    (tree / "AppRun").write_text(f'#!/bin/sh\necho "ran $* in $APPDIR {marker}"\nexit 3\n')
    (tree / "AppRun").chmod(0o755)
    image = tmp_path / "fs.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-noappend", "-all-root"],
                   check=True, capture_output=True, timeout=60)
    app = tmp_path / "My App-1.0.AppImage"
    app.write_bytes(open(STUB, "rb").read() + image.read_bytes())
    return str(app)


def offset_of(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return squashfs.image_offset(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="needs mksquashfs")
def test_the_squashfs_is_found_after_the_elf_part(tmp_path):
    app = make_appimage(tmp_path)
    assert offset_of(app) == os.path.getsize(STUB)
    assert offset_of(tmp_path / "fs.squashfs") == 0
    (tmp_path / "junk").write_bytes(b"not an image at all" * 10)
    with pytest.raises(StartError, match="neither a squashfs image nor an ELF file"):
        offset_of(tmp_path / "junk")
    with pytest.raises(StartError, match="no squashfs image after the ELF part"):
        offset_of(STUB)


@needs_fuse
def test_an_appimage_is_mounted_read_only_and_runs(tmp_path):
    app = make_appimage(tmp_path)
    inner = layer("inner", namespaces=["user", "pid", "mount"], uid=1000, gid=1000,
                  command=["sh", "-c", "APPDIR=/apps/a /apps/a/AppRun x; echo $?; "
                           "touch /apps/a/new 2>&- || echo read-only"])
    outer = app_layer(fs=[*app_layer()["fs"], {"op": "squashfs", "src": app,
                                               "dest": "/apps/a"}], layers=[inner])
    result = run_sandbox(tmp_path, sandbox(outer))
    assert (result.returncode, result.stdout) == (0, "ran x in /apps/a \n3\nread-only\n"), \
        result.stderr


def test_a_file_that_is_no_appimage_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.AppImage"
    junk.write_bytes(b"\x7fELF" + b"\0" * 100)
    outer = app_layer(command=["true"], fs=[*app_layer()["fs"], {"op": "squashfs",
                                                               "src": str(junk),
                                                               "dest": "/apps/a"}])
    result = run_sandbox(tmp_path, sandbox(outer))
    assert result.returncode == 2
    assert "fs[" in result.stderr and "(squashfs) /apps/a:" in result.stderr


@needs_fuse
def test_an_appimage_profile_runs_its_launcher_and_ends_with_the_app(instances, tmp_path,
                                                                    marker):
    app = make_appimage(tmp_path, marker)
    path = tmp_path / "app.toml"
    path.write_text(f'command = ["/sbx/apps/run_My_App-1.0", "arg"]\n'
                    f'mounts = [{{ type = "appimage", src = "{app}" }}]\n')
    result = instances.ctl("start", str(path), stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (
        3, f"ran arg in /sbx/apps/My_App-1.0 {marker}\n"), result.stderr
    (ended,) = json.loads(instances.ctl("ps", "--all", "--json").stdout)
    assert (ended["state"], ended["status"]) == ("exited", 3)
    assert wait_gone(processes_with(app)) == []  # squashfuse went with the sandbox


@needs_fuse
def test_squashfuse_parses_the_image_without_privileges(instances, tmp_path):
    app = make_appimage(tmp_path)
    path = tmp_path / "idle.toml"
    path.write_text(f'command = ["sleep", "600"]\n'
                    f'mounts = [{{ type = "appimage", src = "{app}" }}]\n')
    instances.ids.append(instances.ctl("start", str(path), "--detach").stdout.strip())
    (server,) = [pid for pid in processes_with(app) if "squashfuse" in open(
        f"/proc/{pid}/cmdline").read()]
    status = dict(line.split(":", 1) for line in open(f"/proc/{server}/status"))
    assert {key: status[key].strip() for key in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs")} \
        == {"CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}


def test_an_appimage_profile_without_usable_fuse_is_one_line_per_image(tmp_path, monkeypatch):
    """The validator (and a start) says what a FUSE-less host lacks, at the mount's line."""
    from bbld import profile

    image = tmp_path / "App.AppImage"
    image.write_bytes(b"\x7fELF")
    unusable = tmp_path / "fuse"
    unusable.write_text("")
    unusable.chmod(0)
    monkeypatch.setattr(profile, "FUSE", str(unusable))
    path = tmp_path / "app.toml"
    path.write_text(f'command = ["true"]\n[[mounts]]\ntype = "appimage"\nsrc = "{image}"\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(str(path), {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert caught.value.problems == [
        f"{path}:4: mounts[0]: an AppImage is mounted through FUSE, and {unusable} is not "
        "usable by you: make it mode 0666 (as root; desktop systems ship it so)"]


def test_an_unreadable_appimage_is_the_profiles_problem(tmp_path):
    from bbld import profile

    image = tmp_path / "App.AppImage"
    image.write_bytes(b"\x7fELF")
    image.chmod(0)
    path = tmp_path / "app.toml"
    path.write_text(f'command = ["true"]\nmounts = [\n'
                    f'  {{ type = "appimage", src = "{tmp_path}" }},\n'
                    f'  {{ type = "appimage", src = "{image}" }},\n]\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(str(path), {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert caught.value.problems == [
        f"{path}:{line}: mounts[{index}].src: {source} is not a file you can read: an AppImage "
        "is one (chmod u+r, or fix the path)" for index, (line, source) in
        enumerate([(3, tmp_path), (4, image)])]
