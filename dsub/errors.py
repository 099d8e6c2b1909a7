"""Exceptions dsub raises for problems the user can fix.

Every subclass also inherits the matching built-in exception, so callers that
already catch ``ValueError`` or ``FileNotFoundError`` keep working. The command
line prints ``DsubError`` messages as one clean line and exits non-zero; any
other exception is a bug in dsub.
"""

from __future__ import annotations

import errno
import os

import warnings


class DsubError(Exception):
    """Base class: a problem with the user's inputs or environment."""


class InputFileError(DsubError, ValueError):
    """An input file is unreadable, malformed or inconsistent with the others."""

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path, self.problem, self.fix = str(path), problem, fix
        message = f"{path}: {problem}"
        if fix:
            message += f" {fix}"
        super().__init__(message)

    def __reduce__(self):  # travels intact from a Dask worker to the client
        return type(self), (self.path, self.problem, self.fix)



def first_and_more(names, most: int) -> str:
    """``a, b and 3 more``: the first ``most`` of ``names`` (str), then a count of the rest."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")

def where_stack_names_start(metadata_path) -> str:
    """Where a particle file's relative stack names are looked for, as the reading does (``formats.paths``):
    a .cs's ``blob/path`` from the cryoSPARC project folder, a star's image names from the current folder."""
    if str(metadata_path).lower().endswith(".cs"):
        return ("Check that the stacks are where the file names them: relative names (blob/path) start from the "
                "cryoSPARC project folder (the one holding project.json above the .cs, else the parent of its job "
                "folder J<n>), then the .cs's folder and its parents; --cs-root gives that project folder.")
    return ("Check that the stacks are where the file names them: relative names start from the current folder "
            "(RELION's project folder), then that file's folder and its parents.")


class MissingInputError(DsubError, FileNotFoundError):
    """An input file named on the command line or inside metadata does not exist (or is a folder).

    For stacks named by a particle file (``referenced_from``), ``others`` are
    the further missing stacks (``NAMED_MISSING`` stacks are named in all, the
    first included; the rest counted) and ``rows`` is (rows naming a missing stack, rows in all), so
    that one line says how much is missing, not only the first file.
    """

    def __init__(self, path, referenced_from=None, given_as=None, others=(), rows=None):
        self.path, self.referenced_from, self.given_as = str(path), referenced_from, given_as
        self.others, self.rows = tuple(str(other) for other in others), rows
        message = f"{path}: is a folder, not a file" if os.path.isdir(path) else f"{path}: file not found"
        if referenced_from is not None and (self.others or rows is not None):
            named = ", ".join(self.others[:NAMED_MISSING - 1])
            if len(self.others) > NAMED_MISSING - 1:
                named += f" and {len(self.others) - (NAMED_MISSING - 1)} more"
            stacks = 1 + len(self.others)
            if self.others:
                message += f", nor {'is' if len(self.others) == 1 else 'are'} {named}"
            if rows is not None:
                message += (f" ({stacks} stack file{'s' if stacks > 1 else ''} missing, named by {rows[0]} of the "
                            f"{rows[1]} particles of {referenced_from})")
            else:
                message += f" (referenced from {referenced_from})"
            message += (f". {where_stack_names_start(referenced_from)} To go on without those particles, leave them "
                        "out of the particle file (a selection without their micrographs) and run on that.")
        elif referenced_from is not None:
            message += f" (referenced from {referenced_from}). {where_stack_names_start(referenced_from)}"
        if given_as is not None:
            message += (f" (given as {given_as}). Check the path: a relative one starts from the current folder, "
                        f"{os.getcwd()}")
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.path, self.referenced_from, self.given_as, self.others, self.rows)


#: Missing stacks a ``MissingInputError`` names (the first included); the rest are counted.
NAMED_MISSING = 2


class OptionError(DsubError, ValueError):
    """An option value is invalid or options contradict each other."""


class OutputExistsError(DsubError, FileExistsError):
    """The output folder holds results of a different run."""


class DiskFullError(DsubError, OSError):
    """The output disk filled up while dsub was writing."""


#: How ``threading.Thread.start`` words the system's refusal of a thread (CPython's ``RuntimeError``).
THREAD_LIMIT_MESSAGE = "can't start new thread"
#: What the dynamic loader says (in an ``ImportError``) when a library finds no room in the address space.
MAP_FAILURE_MESSAGE = "failed to map segment from shared object"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the process ran out of memory or address space.

    A ``MemoryError`` (NumPy, CuPy), an ``OSError`` with ``ENOMEM`` (``mmap`` of
    a stack), a thread the system refuses (each reserves its stack in the
    address space) or a library the loader finds no room to map, as a low
    ``ulimit -v`` gives them.
    """
    return (isinstance(exc, MemoryError)
            or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
            or (isinstance(exc, RuntimeError) and str(exc).startswith(THREAD_LIMIT_MESSAGE))
            or (isinstance(exc, ImportError) and MAP_FAILURE_MESSAGE in str(exc)))


def one_task_at_a_time(run) -> bool:
    """Whether a run (its command-line arguments or its ``ClusterSpec``) has one task at a time: ``--workers 1``
    or ``--scheduler sync`` (then running fewer tasks at once is no advice)."""
    return getattr(run, "workers", None) == 1 or getattr(run, "scheduler", None) == "sync"


def resource_failure_line(exc: BaseException, one_task: bool = False) -> str | None:
    """The one line for running out of memory, threads or address space (``MemoryError``, a thread the system
    refuses, a library the loader cannot map), as the command prints it and the run records it; None for any
    other failure. ``one_task``: the run had one task at a time (then fewer tasks is no advice)."""
    said = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        fewer = "" if one_task else " or run fewer tasks at once (--workers)"
        return (f"dsub: error: out of memory ({said or 'an allocation failed'}). Give dsub more memory (a larger "
                f"batch job, a higher 'ulimit -v': mapped stacks count against it){fewer}; rerun the same command "
                "to resume.")
    if isinstance(exc, RuntimeError) and said.startswith(THREAD_LIMIT_MESSAGE):
        # threading.Thread.start when the system refuses a thread: each reserves its stack in the address space.
        return ("dsub: error: the system refused another thread (can't start new thread): an address-space limit "
                "('ulimit -v': each thread reserves its stack, mapped stacks count too) or a limit on processes "
                "('ulimit -u') is reached. Raise it or run where it is higher; rerun the same command to resume.")
    if isinstance(exc, ImportError) and MAP_FAILURE_MESSAGE in said:
        # A module loaded late (its first use) whose library the address-space limit left no room to map.
        return (f"dsub: error: out of address space while loading a library ({said}). Give dsub more memory (a "
                "higher 'ulimit -v': mapped stacks and libraries count against it, or a larger batch job); rerun "
                "the same command to resume.")
    return None


class DsubWarning(UserWarning):
    """Something the user should know that does not stop the run (shown by the CLI)."""


def warn(message: str) -> None:
    """Issue a ``DsubWarning``: the command line prints these, and only these, as ``dsub: warning:``."""
    warnings.warn(message, DsubWarning, stacklevel=2)


#: What the command line prints when the user stops a run (Ctrl-C).
INTERRUPTED = "dsub: interrupted; rerun the same command to resume"
TERMINATED = ("dsub: stopped by SIGTERM (a batch system's time limit, a preemption or a cancel); rerun the same "
              "command to resume")
#: The same, where the run was stopped before it wrote anything to resume (``interrupted_line``).
INTERRUPTED_BEFORE_WRITING = "dsub: interrupted before anything was written; rerun the command to start"
TERMINATED_BEFORE_WRITING = ("dsub: stopped by SIGTERM (a batch system's time limit, a preemption or a cancel) "
                             "before anything was written; rerun the command to start")
#: How to resume a run whose command had ``--overwrite`` (``interrupted_line``): that command again starts over.
RESUME_WITHOUT_OVERWRITE = ("rerun the command without --overwrite to resume (the same command with --overwrite "
                            "starts over)")

#: What the line says where ``--overwrite`` removed the earlier run's outputs (``interrupted_line``): stopped
#: before their store was renamed aside (it is whole); after that, before this run's store had its identity
#: (nothing of either run to resume); and once it had.
STARTS_AFRESH = " before anything was written; rerun the command to start"
EARLIER_STORE_WHOLE = (" while the earlier results in the output folder were removed (--overwrite), before their store "
                       "was: it is whole, and the command that made it finishes that run again; rerun this command "
                       "(with --overwrite) to start this run")
EARLIER_REMOVED = (" after the earlier results in the output folder were removed (--overwrite), before this run's "
                   "store was written: nothing of either run is left to resume; rerun the command (with --overwrite) "
                   "to start")
EARLIER_REPLACED = "; the earlier results in the output folder were replaced by this run's: rerun the command without --overwrite"


def interrupted_line(exc: BaseException) -> str:
    """The line for a Ctrl-C or SIGTERM (``Terminated``): resume, or start where nothing was written, or
    draw the report where only the report was cut short (``results_complete``: OUTDIR).

    The run marks the exception ``nothing_written`` when OUTDIR holds no store of it after
    it (its folder, lock and log removed as found): the rerun then starts, with nothing to
    resume; and ``overwrite_given`` when its command had ``--overwrite`` and its store is
    there: the same command would replace that store, so the line says to rerun without it;
    ``earlier_replaced`` when that command had begun to remove the earlier run's outputs
    (until then they are whole, and "nothing was written" is the whole truth), with
    ``earlier_store_whole`` where their store was not yet renamed aside: the line
    then says that store is whole, else that nothing of either run is left.
    """
    complete = getattr(exc, "results_complete", None)
    if complete is not None:  # stopped while the QC report was drawn (``pipeline.write_qc_report``)
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        if getattr(exc, "report_complete", False):
            return (f"dsub: {how} as the run ended; the results in {complete} are complete (star, .cs, stacks), "
                    "and so is its QC report.")
        return (f"dsub: {how} while the QC report was drawn; the results in {complete} are complete (star, .cs, "
                f"stacks). Draw the report with: dsub report {complete}")
    before = getattr(exc, "nothing_written", False)
    if isinstance(exc, Terminated):
        line = TERMINATED_BEFORE_WRITING if before else TERMINATED
    else:
        line = INTERRUPTED_BEFORE_WRITING if before else INTERRUPTED
    if not before and getattr(exc, "overwrite_given", False):
        line = line.replace("rerun the same command to resume", RESUME_WITHOUT_OVERWRITE)
        if isinstance(exc, Terminated) and os.environ.get("SLURM_JOB_ID"):
            line += "; a job that SLURM requeues (--requeue, a preemption) resumes by itself, --overwrite and all"
    if getattr(exc, "earlier_replaced", False):  # --overwrite: the earlier run's outputs were (being) removed
        if before:
            whole = getattr(exc, "earlier_store_whole", False)
            line = line.replace(STARTS_AFRESH, EARLIER_STORE_WHOLE if whole else EARLIER_REMOVED)
        else:
            line = line.replace("; rerun the command without --overwrite", EARLIER_REPLACED)
    return line


#: Added to an error that says to rerun the same command where that command has ``--overwrite``
#: (``add_overwrite_note``).
OVERWRITE_NOTE = "This command has --overwrite: rerun it without --overwrite to resume; with it, it starts over."


def add_overwrite_note(error: DsubError) -> DsubError:
    """``error`` (a run's, whose command has ``--overwrite`` and whose store is there) with ``OVERWRITE_NOTE``
    added where its message says to rerun the same command; returns it."""
    if "rerun the same command" in str(error) and OVERWRITE_NOTE not in str(error):
        error.args = (f"{str(error).rstrip()} {OVERWRITE_NOTE}", *error.args[1:])
    return error


class Terminated(KeyboardInterrupt):
    """SIGTERM received by the command (``cli.main`` turns the signal into this), so the run records it."""


def error_line(error) -> str:
    """The one line the command line prints for an error (its message with line breaks folded)."""
    return f"dsub: error: {' '.join(str(error).split())}"
