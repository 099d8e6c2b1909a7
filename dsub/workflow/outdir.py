"""The output folder: what identifies a run, and whether OUTDIR may be used or resumed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from ..cluster.progress import number
from ..errors import DiskFullError, DsubError, InputFileError, OptionError, OutputExistsError, first_and_more
from . import export, store
from .options import cannot_create


def file_identity(path) -> dict:
    """What identifies an input file's content cheaply: absolute path, size, modification time."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


#: The inputs whose identity in the store also holds a hash of their content (``with_content_hashes``):
#: the maps and the mask, so that a changed modification time alone (``touch``, a copy without
#: ``cp -p``/``rsync -t``) does not stop a resume. Not the particle stacks, which may be terabytes.
CONTENT_HASHED = ("half_a", "half_b", "mask")
#: The key of that hash in a file's identity: BLAKE2b (RFC 7693) of the whole file, hex.
HASH_KEY = "blake2b"
#: Bytes read at a time while hashing.
HASH_BLOCK = 1 << 20


def content_hash(path) -> str:
    """BLAKE2b (32-byte digest, hex) of a file's content, read in blocks of ``HASH_BLOCK`` bytes.

    About 0.8 GB/s of CPU: 0.7 s for a 512³ float32 map (``hashlib`` releases the GIL while hashing).
    """
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def with_content_hashes(identity: dict) -> dict:
    """``identity`` (``pipeline.run_identity``) with ``HASH_KEY`` added to the maps' and mask's identities."""
    hashes: dict[str, str] = {}  # --single-map gives one file as both half maps: read once
    hashed = dict(identity)
    for name in CONTENT_HASHED:
        if isinstance(identity.get(name), dict):
            path = identity[name]["path"]
            if path not in hashes:
                hashes[path] = content_hash(path)
            hashed[name] = {**identity[name], HASH_KEY: hashes[path]}
    return hashed


def without_content_hashes(identity: dict) -> dict:
    """``identity`` without the maps' and mask's content hashes: what the fingerprint and comparisons use."""
    plain = dict(identity)
    for name in CONTENT_HASHED:
        if isinstance(identity.get(name), dict):
            plain[name] = {key: value for key, value in identity[name].items() if key != HASH_KEY}
    return plain


def run_fingerprint(identity: dict) -> str:
    """A short hash of a run's inputs and parameters; equal fingerprints mean a run can resume.

    Content hashes (``with_content_hashes``) are left out: a store written
    before they were kept has the same fingerprint as one with them.
    """
    return hashlib.sha256(json.dumps(without_content_hashes(identity), sort_keys=True).encode()).hexdigest()[:16]


def same_content_touched(earlier: dict, now: dict) -> list[str]:
    """The maps and mask that only the modification time tells apart from the earlier run's, content unchanged.

    ``earlier``: the store's run attributes; ``now``: this run's identity. A
    file counts where the earlier run kept its content hash (stores of earlier
    versions did not: for them only size and time count), the path and size
    are the same, the time is not, and the content hashes alike.
    """
    touched = []
    for name in CONTENT_HASHED:
        before, after = earlier.get(name), now.get(name)
        if not (isinstance(before, dict) and isinstance(after, dict) and before.get(HASH_KEY)):
            continue
        if (before.get("path"), before.get("bytes")) != (after.get("path"), after.get("bytes")) \
                or before.get("mtime_ns") == after.get("mtime_ns"):
            continue
        with contextlib.suppress(OSError):  # unreadable now: the usual refusal says what changed
            if content_hash(after["path"]) == before[HASH_KEY]:
                touched.append(name)
    return touched


def relocated(earlier: dict, now: dict) -> tuple[dict, str, str] | None:
    """Whether the earlier run's inputs are this run's moved as a whole (``mv`` of the project folder):
    (``earlier`` with its paths moved, the old folder, the new folder), else None.

    The folder is what the input files' paths (the particles, maps and mask) have
    before the part they share with this run's, the same for every input that
    moved. With the earlier paths under it moved, nothing else may differ: every
    file's size and modification time (which ``mv`` and ``cp -p`` keep), the
    particle stacks and passthrough files, the parameters (``identity_differences``).
    """
    roots = set()
    for name in INPUT_OPTIONS:
        before, after = earlier.get(name), now.get(name)
        if not (isinstance(before, dict) and isinstance(after, dict)):
            continue
        old, new = Path(before["path"]).parts, Path(after["path"]).parts
        if old == new:
            continue
        shared = 0
        while shared < min(len(old), len(new)) and old[-1 - shared] == new[-1 - shared]:
            shared += 1
        if shared == 0 or shared == len(old):
            return None
        roots.add((str(Path(*old[:-shared])), str(Path(*new[:-shared]))))
    if len(roots) != 1:
        return None
    old_root, new_root = roots.pop()

    def moved(identity):
        path = Path(identity["path"])
        if path.is_relative_to(old_root):
            return {**identity, "path": str(Path(new_root) / path.relative_to(old_root))}
        return identity

    translated = dict(earlier)
    for name in INPUT_OPTIONS:
        if isinstance(earlier.get(name), dict):
            translated[name] = moved(earlier[name])
    for key in FILE_LISTS:
        if isinstance(earlier.get(key), list):
            translated[key] = sorted((moved(entry) for entry in earlier[key]), key=lambda entry: entry["path"]) \
                if key == "stacks" else [moved(entry) for entry in earlier[key]]
    if identity_differences(translated, now):
        return None
    return translated, old_root, new_root


#: Keys that runs of earlier versions put in their identity and that are no part of it now. ``cs_root``
#: (``--cs-root``): where a .cs's ``blob/path`` start decides which stacks are read, and those stacks are in the
#: identity; otherwise it only names the stacks in the output .cs, which a rerun writes again (as for ``--paths``).
RETIRED_KEYS = ("cs_root",)


def recorded_fingerprint(identity: dict, earlier: dict) -> str:
    """The fingerprint ``identity`` had under the rules of the run that recorded ``earlier`` (a store's run
    attributes): with that run's values of ``RETIRED_KEYS``, so that its store still resumes."""
    return run_fingerprint({**identity, **{key: earlier[key] for key in RETIRED_KEYS if key in earlier}})


def same_run(earlier: dict, fingerprint: str, identity: dict | None = None) -> bool:
    """Whether a store's run attributes ``earlier`` record the run of ``fingerprint`` (and ``identity``)."""
    recorded = earlier.get("fingerprint")
    if recorded == fingerprint:
        return True
    return identity is not None and any(key in earlier for key in RETIRED_KEYS) \
        and recorded == recorded_fingerprint(identity, earlier)


#: Where a run's identity (``pipeline.run_identity``) comes from on the command line.
INPUT_OPTIONS = {"particles": "the particle file", "half_a": "--half-a", "half_b": "--half-b", "mask": "--mask"}
PARAMETER_OPTIONS = {
    "settings.projector": "--projector", "settings.padding": "--padding", "settings.scale": "--scale",
    "settings.mask_keeps": "--mask-keeps", "settings.fit.window_inner": "--window-inner",
    "settings.fit.window_outer": "--window-outer", "settings.fit.low_resolution_angstrom": "--fit-lowres",
    "settings.fit.high_resolution_angstrom": "--fit-highres", "chunk_size": "--chunk-size",
    "single_map": "--single-map", "skip_bad_particles": "--skip-bad-particles",
    "dsub": "the dsub version", "count": "the number of particles", "box": "the box size",
    "float16": "--float16", "settings.lowpass_angstrom": "--lowpass", "settings.corners": "--corners",
    "settings.extension": "--extension", "settings.field_slice": "--field-slice",
    "settings.fit.weighting": "--fit-weighting", "rebox.center_voxels": "the centre (--recenter, --center)",
    "rebox.new_box": "--new-box", "particles_per_stack": "--particles-per-stack",
}
#: Lists of input files in a run's identity, and what one of them is called in a refusal (``file_list_differences``).
FILE_LISTS = {"stacks": "particle stack", "passthrough": "passthrough file"}
#: Key of a store's run attributes listing the identity's values dsub chose itself (``--chunk-size`` and the
#: stacks' size following it, when not given): a refusal says so instead of quoting them as the user's.
AUTOMATIC_KEY = "chosen_automatically"
#: Parameters a run's identity leaves out at their default (``pipeline.run_identity``).
PARAMETER_DEFAULTS = {"float16": False}
#: How many changed stacks a refusal names before it only counts them.
NAMED_STACKS = 3


#: The lock a running dsub holds on its output folder (``OutdirLock``).
LOCK_NAME = ".dsub.lock"


class OutdirLock:
    """Exclusive use of an output folder by one dsub run at a time (an advisory ``flock`` on a file in it).

    Two runs writing one store would mix their chunks (a job submitted twice, a
    requeued job while the first still runs). ``acquire`` creates the folder if
    needed and raises ``OptionError`` naming the other run (pid, host, start)
    when it holds the folder; the lock goes with ``release`` or the process.
    ``leave_as_found`` takes away what acquiring made, for a run that stopped
    before writing anything else (a scheduler it cannot reach, a refusal).
    """

    def __init__(self, outdir: Path):
        self.outdir, self.fd = Path(outdir), None
        self.made_folders: list[Path] = []  # the folders acquire made, OUTDIR first
        self.found: set[str] | None = None  # OUTDIR's entries before the lock file was made
        self.made_lock_file = False

    def acquire(self) -> None:
        try:
            missing = [path for path in (self.outdir, *self.outdir.parents) if not path.exists()]
            self.outdir.mkdir(parents=True, exist_ok=True)
            self.made_folders = missing
            self.found = set(os.listdir(self.outdir))
            self.made_lock_file = LOCK_NAME not in self.found
            fd = os.open(self.outdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OptionError(cannot_create(self.outdir, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OptionError(f"{self.outdir}: another dsub run is using this output folder ({holder}). Wait for "
                              "it to finish (or stop it), then rerun to resume; or choose another folder with -o.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def leave_as_found(self, made_log: Path | None = None) -> None:
        """After a run that failed: if it wrote nothing in OUTDIR but the lock file and its log, remove them.

        The lock file and ``made_log`` (``dsub.log`` where this run created it)
        go where this run made them, and the folders ``acquire`` made go with
        them: a folder that did not exist is not left behind holding only those,
        and an existing one keeps no lock file of a run that did nothing there.
        A run that wrote anything else (its store) keeps its lock file and log,
        as any run does. Call it before ``release``: the file goes while this
        run still holds its lock.
        """
        if self.fd is None or self.found is None:
            return
        ours = ({LOCK_NAME} if self.made_lock_file else set()) | ({made_log.name} if made_log is not None else set())
        try:
            now = set(os.listdir(self.outdir))
        except OSError:
            return
        if not now <= self.found | ours:
            return
        for name in sorted(ours & now):
            with contextlib.suppress(OSError):
                os.unlink(self.outdir / name)
        for folder in self.made_folders:  # OUTDIR first, then the parents it needed
            try:
                folder.rmdir()
            except OSError:  # not empty (something else was written there meanwhile): it stays
                break


def chunks_done(store_path: Path) -> tuple[int, int] | None:
    """(finished, all) chunks of the store at ``store_path``; None where they cannot be read."""
    try:
        finished = store.finished_chunks(store_path)
    except Exception:  # noqa: BLE001 -- only a message's detail: the refusal stands without it
        return None
    return int(finished.sum()), len(finished)


def prepare_outdir(outdir: Path, fingerprint: str, overwrite: bool, identity: dict | None = None,
                   tell=None, before_changes=None) -> bool:
    """Make the output folder ready; True if an identical earlier run's store can be resumed.

    A folder that holds a different run is refused (``OutputExistsError``) unless
    ``overwrite``; with this run's ``identity`` the message names what differs.
    A map or mask whose modification time alone changed, its content hashing as
    the earlier run's did (``same_content_touched``), does not make a different
    run: the store takes the new times and ``tell`` (a function of one line) says so.
    ``before_changes`` (a function of whether the store is resumed) is called once
    that is decided and before anything in OUTDIR changes: a last check that may
    refuse the run (the disk's room) and leave OUTDIR as it was.
    A store whose creation was stopped (``store.creation_stopped``: a run stopped
    before its identity was written) is nothing to resume: it is removed first,
    and ``tell`` says so, as is a store an earlier stop left renamed aside
    (``remove_store``); one that cannot be read is refused, named, without ``overwrite``.
    With ``overwrite`` nothing of an earlier run is removed here: the run removes
    it where it starts to write (``remove_store``, last of its outputs), so that
    a run stopped while it starts its workers leaves the earlier results whole.
    """
    def deciding(resumes: bool) -> None:
        if before_changes is not None:
            before_changes(resumes)

    store_path = outdir / store.STORE_NAME
    # What a stopped --overwrite run left of the store it was deleting (``remove_store``) is no store.
    shutil.rmtree(store_path.with_name(REMOVED_STORE_NAME), ignore_errors=True)
    if store.creation_stopped(store_path):  # no run identity yet: nothing to resume, and no run to name
        remove_store(store_path)
        if tell is not None:
            tell(f"dsub: {store_path}: a store whose creation was stopped (it records no run): nothing to resume, "
                 "removed.")
    if store_path.exists():
        try:
            earlier = dict(store.open_store(store_path).attrs.get("run", {}))
        except Exception as exc:
            if not overwrite:  # nothing to compare this run with: say what is wrong, not "a different run"
                raise OutputExistsError(
                    f"{store_path}: this store cannot be read ({type(exc).__name__}: {exc}), so it is no run dsub "
                    "can resume. Choose another output folder, or add --overwrite to replace it.") from exc
            earlier = {}
        if same_run(earlier, fingerprint, identity) and not overwrite:
            deciding(True)
            return True
        if not overwrite and earlier and identity:
            touched = same_content_touched(earlier, identity)
            # As this run would be had those files kept their times:
            as_before = {**identity, **{name: {**identity[name], "mtime_ns": earlier[name]["mtime_ns"]}
                                        for name in touched}}
            if touched and run_fingerprint(as_before) == earlier.get("fingerprint"):
                deciding(True)
                store.open_store(store_path, mode="r+").attrs["run"] = {
                    **earlier, **{name: {**identity[name], HASH_KEY: earlier[name][HASH_KEY]} for name in touched},
                    "fingerprint": fingerprint}
                for name in touched:
                    if tell is not None:
                        tell(f"dsub: {INPUT_OPTIONS[name]} {identity[name]['path']}: its modification time changed "
                             f"since that run ({modified(earlier[name])} → {modified(identity[name])}), its "
                             "content did not: resuming.")
                return True
            identity = as_before  # the files whose content is unchanged are not named as changed
            move = relocated(earlier, identity)
            if move is not None:  # the same files, moved as a whole: the store takes the new paths
                translated, old_root, new_root = move
                deciding(True)
                store.open_store(store_path, mode="r+").attrs["run"] = {**translated, "fingerprint": fingerprint}
                if tell is not None:
                    tell(f"dsub: the inputs moved from {old_root} to {new_root} since that run (the same files: "
                         "sizes and modification times): resuming.")
                return True
        if not overwrite:
            changes = identity_differences(earlier, identity) if earlier and identity else []
            what = "; ".join(changes) if changes else "other inputs or parameters"
            done = chunks_done(store_path)
            if done is not None and done[0] < done[1]:  # stopped before its end: its command would finish it
                raise OutputExistsError(
                    f"{outdir}: holds an unfinished run ({done[0]} of {done[1]} chunks done) that differs from this "
                    f"one: {what}. Rerun that run's command (without --overwrite) to finish it, choose another "
                    "output folder, or add --overwrite to replace it.")
            raise OutputExistsError(
                f"{outdir}: holds the results of a different run: {what}. "
                "Choose another output folder, or add --overwrite to replace them."
            )
        deciding(False)  # --overwrite: the store stays until the run starts to write (``remove_store``)
    else:
        found = None if overwrite else outputs_without_store(outdir)
        if found:
            raise OutputExistsError(
                f"{outdir}: holds {found} but no dsub store ({store.STORE_NAME}): no run of dsub to resume, and "
                "dsub does not write its results there without --overwrite, which replaces dsub's own files "
                f"({export.STAR_NAME}, {export.CS_NAME}, {export.STACK_FOLDER}/subtracted_NNNN.mrcs, dsub_run.json, "
                "dsub.log, report/) and leaves any other in place. Choose another output folder, or add --overwrite."
            )
        deciding(False)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(cannot_create(outdir, exc)) from exc
    if not os.access(outdir, os.W_OK):
        raise OptionError(f"{outdir}: the output folder is not writable. Choose a folder you can write to with -o.")
    return False


#: What an earlier run's store is renamed to before it is deleted (``remove_store``), in its folder.
REMOVED_STORE_NAME = f".{store.STORE_NAME}.removed"


def remove_store(store_path: Path) -> None:
    """Delete the store at ``store_path`` (an earlier run's, replaced with ``--overwrite``), if there.

    It is first renamed (``REMOVED_STORE_NAME``, one atomic step) and then
    deleted: a stop in between leaves either the whole store or none, never
    a part that could be taken for a store. A renamed one an earlier stop left
    is deleted too.
    """
    store_path = Path(store_path)
    removed = store_path.with_name(REMOVED_STORE_NAME)
    shutil.rmtree(removed, ignore_errors=True)
    if store_path.exists():
        os.replace(store_path, removed)
        shutil.rmtree(removed, ignore_errors=True)


def outputs_without_store(outdir: Path) -> str | None:
    """What in OUTDIR (no store) has the names of dsub's outputs, in words; None if nothing.

    E.g. ``particles_subtracted.star`` or ``a Particles/ folder (mine.mrcs and 2 more)``:
    a run whose store is gone, or files of the user's own in the folder dsub writes its stacks to.
    """
    found = [name for name in (export.STAR_NAME, export.CS_NAME) if (outdir / name).exists()]
    folder = outdir / export.STACK_FOLDER
    if folder.exists():
        try:
            names = sorted(os.listdir(folder))
        except OSError:  # a file of that name, or a folder it may not list
            names = None
        held = ("" if names is None else " (empty)" if not names
                else f" ({names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})")
        found.append(f"a {export.STACK_FOLDER}/ folder{held}" if folder.is_dir() else export.STACK_FOLDER)
    return " and ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found) or None


def explain_os_error(exc: OSError, outdir: Path) -> DsubError | None:
    """The one clear message for an OS error that the user can fix, or None for any other.

    A full disk or quota, and a file or folder dsub may not read or write, wherever
    they happen: checking the inputs, in a task, or during the export.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(exc, outdir)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return access_denied(exc, outdir)
    return None


def disk_full(exc: OSError, outdir: Path) -> DiskFullError:
    """A full disk (or quota) while writing: what to do, and that finished chunks are kept."""
    where = exc.filename or outdir
    what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return DiskFullError(
        f"{where}: {what} while writing the results. Free space and rerun the same command: finished chunks are "
        f"kept and the run resumes. A new output folder (-o) starts over: the finished chunks stay in {outdir}."
    )


def access_denied(exc: OSError, outdir: Path) -> DsubError:
    """A permission error: in OUTDIR (or on its way) the folder to fix, elsewhere the file to make readable."""
    where = Path(exc.filename) if exc.filename else outdir
    target, folder = Path(os.path.abspath(where)), Path(os.path.abspath(outdir))
    if exc.errno == errno.EROFS or target.is_relative_to(folder) or folder.is_relative_to(target):
        return OptionError(
            f"{where}: cannot write there ({exc.strerror}). Make the output folder writable and rerun the "
            "same command (finished chunks are kept), or choose another folder with -o."
        )
    return InputFileError(where, f"cannot be opened ({exc.strerror}).",
                          "Check its permissions, and those of the folders above it, for your user.")


def identity_differences(earlier: dict, now: dict) -> list[str]:
    """What differs between an earlier run's identity and this one's, in the command line's words.

    E.g. ``--scale was fit, now input``, ``--float16 was off, now on`` or ``--half-a /data/half_A.mrc has changed since that run
    (1 000 → 2 000 bytes; modified 2026-11-29T10:00:00.000000000+00:00 → 2026-11-29T11:00:00.000000000+00:00)``.
    """
    changes = [change for name, option in INPUT_OPTIONS.items()
               if (change := file_difference(option, earlier.get(name), now.get(name)))]
    for key, noun in FILE_LISTS.items():
        changes += file_list_differences(earlier.get(key) or [], now.get(key) or [], noun)
    before, after = flatten(earlier), flatten(now)
    automatic = set(earlier.get(AUTOMATIC_KEY) or [])  # what that run chose itself: not the user's words
    if "particles_per_stack" not in before:  # that run's default, which follows its chunks
        automatic.add("particles_per_stack")
    derived_now = "particles_per_stack" not in after  # this run's default too
    for values in (before, after):  # left out at the default, which depends on the run's chunks
        chunk = values.get("chunk_size")
        if "particles_per_stack" not in values and isinstance(chunk, int) and chunk >= 1:
            values["particles_per_stack"] = export.default_stack_size(chunk)
    for key, option in PARAMETER_OPTIONS.items():
        was, now = (values.get(key, PARAMETER_DEFAULTS.get(key)) for values in (before, after))
        if was != now:
            if key == "particles_per_stack" and key in automatic and derived_now \
                    and before.get("chunk_size") != after.get("chunk_size"):
                continue  # both runs' default, which follows --chunk-size: that line says it
            default_now = key == "particles_per_stack" and derived_now  # left out: the default for these chunks
            changes.append(f"{option} was {shown(was)}{' (chosen by dsub for that run)' if key in automatic else ''}, "
                           f"now {shown(now)}{' (the default for these chunks)' if default_now else ''}")
    named = (set(PARAMETER_OPTIONS) | set(INPUT_OPTIONS)
             | set(FILE_LISTS) | {"fingerprint", "rebox.map_pixel_size", AUTOMATIC_KEY, *RETIRED_KEYS})
    for key in sorted(set(before) | set(after)):  # anything else the identity holds, by its own name
        if not any(key == name or key.startswith(name + ".") for name in named):
            was, now = before.get(key, PARAMETER_DEFAULTS.get(key)), after.get(key, PARAMETER_DEFAULTS.get(key))
            if was != now:
                changes.append(f"{key} was {shown(was)}, now {shown(now)}")
    return changes


def shown(value) -> str:
    """An option's value as the command line writes it: a flag on or off, a number as written, a word bare,
    and "not given" for an option left out."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "not given"
    if isinstance(value, float):
        return f"{value:.15g}"  # every digit a value was given with: 2.0000001 is not said as 2
    return str(value) if isinstance(value, (int, str)) else repr(value)


def file_difference(option: str, earlier: dict | None, now: dict | None) -> str | None:
    """How one input file differs: another path, or the same path with another size or time."""
    if not earlier or not now:
        return None
    earlier, now = ({key: value for key, value in each.items() if key != HASH_KEY} for each in (earlier, now))
    if earlier == now:
        return None
    if earlier["path"] != now["path"]:
        return f"{option} was {earlier['path']}, now {now['path']}"
    return f"{option} {now['path']} has changed since that run ({file_change_details(earlier, now)})"


def file_change_details(earlier: dict, now: dict) -> str:
    """What changed in one file's identity (same path): its size and modification time, before → after."""
    details = []
    if earlier["bytes"] != now["bytes"]:
        details.append(f"{number(earlier['bytes'])} → {number(now['bytes'])} bytes")
    if earlier["mtime_ns"] != now["mtime_ns"]:
        details.append(f"modified {modified(earlier)} → {modified(now)}")
    return "; ".join(details) or "its identity differs"


def file_list_differences(earlier: list[dict], now: list[dict], noun: str = "particle stack") -> list[str]:
    """Files of one list (particle stacks, ``--passthrough`` files) changed, added or no longer used, the first
    few by name; the first changed one with its size and modification time before and after
    (``file_change_details``). ``noun``: what one file is called, e.g. ``particle stack``."""
    before = {stack["path"]: stack for stack in earlier}
    after = {stack["path"]: stack for stack in now}
    groups = (
        ("changed since that run", [path for path in after if path in before and after[path] != before[path]]),
        ("new", [path for path in after if path not in before]),
        ("no longer used", [path for path in before if path not in after]),
    )
    changes = []
    for what, paths in groups:
        if paths:
            named = first_and_more(paths, NAMED_STACKS)
            line = f"{noun}{'s' if len(paths) > 1 else ''} {what}: {named}"
            if what == "changed since that run":
                line += f" ({'first ' if len(paths) > 1 else ''}{file_change_details(before[paths[0]], after[paths[0]])})"
            changes.append(line)
    return changes


def modified(identity: dict) -> str:
    """A file identity's modification time as ISO 8601 UTC, to the nanosecond the comparison uses."""
    seconds, nanoseconds = divmod(int(identity["mtime_ns"]), 10**9)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanoseconds:09d}+00:00"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"settings": {"fit": {"window_inner": 1}}} -> {"settings.fit.window_inner": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: How many of an input's files inside OUTDIR's results a refusal names before it only counts them.
NAMED_INSIDE = 2


def replaced_by_overwrite(path, outdir: Path, files: tuple[str, ...], folders: tuple[str, ...]) -> bool:
    """Whether ``path`` is among what ``--overwrite`` removes of an earlier run in ``outdir``.

    ``files``: the names in OUTDIR that go (the star, .cs, ``dsub_run.json``, ``dsub.log``, …);
    ``folders``: the folders in OUTDIR that go whole (the store, the report); and the stacks
    ``Particles/subtracted_NNNN.mrcs`` (``export.is_stack_name``). ``path`` counts both as
    written and with its links followed, as does ``outdir``: a link elsewhere to a file there is lost too.
    """
    bases = {Path(os.path.abspath(outdir)), Path(os.path.realpath(outdir))}
    for candidate in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
        for base in bases:
            if not candidate.is_relative_to(base):
                continue
            parts = candidate.relative_to(base).parts
            if not parts:
                continue
            if (len(parts) == 1 and parts[0] in files) or parts[0] in folders or (
                    len(parts) == 2 and parts[0] == export.STACK_FOLDER and export.is_stack_name(parts[1])):
                return True
    return False


def refuse_inputs_in_replaced_outputs(outdir: Path, inputs: dict, overwrite: bool, files: tuple[str, ...],
                                      folders: tuple[str, ...]) -> None:
    """Refuse (``OutputExistsError``), before anything in OUTDIR changes, a run reading what it would remove.

    ``inputs``: {what the input is called (``the particles``, ``--mask``, ``the stacks that
    particles_subtracted.star names``): its paths}. A run on an earlier run's results written to
    the same OUTDIR (a chained run with the first run's ``-o``) would, with ``--overwrite``, delete
    its own input before reading it (``replaced_by_overwrite``: ``files``, ``folders``); without
    it, it is a different run, refused, whose message would otherwise advise ``--overwrite``.
    """
    found = []
    for what, paths in inputs.items():
        inside = sorted({str(path) for path in paths if path is not None
                         and replaced_by_overwrite(path, outdir, files, folders)})
        if inside:
            named = first_and_more(inside, NAMED_INSIDE)
            found.append(f"{what} ({named})")
    if not found:
        return
    why = ("which --overwrite removes as this run starts to write" if overwrite else
           "which only --overwrite would replace, deleting them before this run read them")
    raise OutputExistsError(
        f"{outdir}: holds this run's input{'s' if len(found) > 1 else ''} among the results of an earlier run "
        f"there, {why}: {'; '.join(found)}. Nothing was removed. Write this run to another output folder with -o.")
