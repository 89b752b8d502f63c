#!/usr/bin/env python3
"""Single-point mutation testing over a listed set of mutants: does the suite notice?

Each mutant changes one snippet of one source file (a bound doubled or halved, a deadline made
1.5x, a branch removed, a comparison flipped), runs only the test files that cover that code,
under a time limit, and puts the file back. A mutant is *killed* when those tests fail (or time
out), and *survives* when they pass: a survivor is a hole in the suite, or a change that does
not alter behaviour (then say why in ``ACCEPTABLE``). A mutant of ``_compiled.pyx`` rebuilds
the extension before its tests and after it is undone.

    scripts/mutate.py --check             # every snippet applies, once; nothing runs
    scripts/mutate.py                     # all mutants, one at a time, at nice 10
    scripts/mutate.py --only relay-abrupt,idle-halved --timeout 300
    scripts/mutate.py --list

Results go to tests/mutation/results.md (the table, the kill rate, and each survivor with
its reason). The run refuses to start when a file it mutates has uncommitted changes, and
restores every file it touched even when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "portside"
RESULTS = REPO / "tests" / "mutation" / "results.md"
#: Only the pure engines (the compiled one has its own twin of much of this code, mutated
#: separately): the mutant's tests run faster without the compiled, asyncio and uvloop ids.
PURE = "not compiled and not asyncio and not uvloop"
EPOLL_ONLY = "epoll or not (compiled or asyncio or uvloop)"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under src/portside
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files (under tests/) that cover it
    what: str
    k: str | None = EPOLL_ONLY  # a pytest -k filter, None for every test in those files


def m(name: str, path: str, old: str, new: str, tests: str, what: str,
      k: str | None = EPOLL_ONLY) -> Mutant:
    return Mutant(name, path, old, new, tuple(f"tests/{t}" for t in tests.split()), what, k)


TIMEOUTS = "test_timeouts.py"
LIMITS = "test_limits.py"
ADMISSION = "test_admission.py test_admission_policy.py"
MUTANTS: tuple[Mutant, ...] = (
    # -- deadlines and timeouts (engine/deadlines.py, timeouts.py, listener.py) -----------------
    m("deadline-1.5x", "engine/deadlines.py", "self._due[item] = now + self.timeout",
      "self._due[item] = now + 1.5 * self.timeout", f"{TIMEOUTS} {LIMITS}",
      "every pure deadline 1.5x late"),
    m("deadline-early", "engine/deadlines.py", "self._due[item] = now + self.timeout",
      "self._due[item] = now + self.timeout / 1.5", f"{TIMEOUTS} {LIMITS}",
      "every pure deadline 1.5x early"),
    m("deadline-expire-flip", "engine/deadlines.py",
      "            if due > now:\n                break",
      "            if due < now:\n                break", f"{TIMEOUTS} {LIMITS}",
      "pop_expired stops at the wrong end"),
    m("stale-age-ignored", "engine/deadlines.py",
      "return self.pop_expired(now + self.timeout - age)",
      "return self.pop_expired(now)", LIMITS, "the pressure sweep waits the full timeout"),
    m("tracker-no-rearm", "engine/timeouts.py", "        self._timer = None\n        self._arm()",
      "        self._timer = None", f"{TIMEOUTS} {LIMITS}",
      "the tracker's timer is not armed again after a sweep"),
    m("closing-not-counted", "engine/timeouts.py",
      "            if self._expire(conn) is not False:\n                self.expired += 1",
      "            if self._expire(conn) is not False:\n                pass", TIMEOUTS,
      "expired deadlines are not counted"),
    m("write-timeout-graceful", "engine/listener.py",
      "CloseReason.WRITE_TIMEOUT,\n" + " " * 44 + "abort=True)\n        #: read_timeout",
      "CloseReason.WRITE_TIMEOUT,\n" + " " * 44 + "abort=False)\n        #: read_timeout",
      TIMEOUTS,
      "the write timeout closes gracefully (waits on a peer that never reads)"),
    m("idle-halved", "engine/listener.py",
      "self.idle_tracker = self._optional(config.idle_timeout,",
      "self.idle_tracker = self._optional(config.idle_timeout / 2,", TIMEOUTS,
      "idle timeout halved"),
    m("write-quartered", "engine/listener.py",
      "self.write_tracker = self._optional(config.write_timeout,",
      "self.write_tracker = self._optional(config.write_timeout / 4,", TIMEOUTS,
      "write timeout quartered"),
    m("read-1.5x", "engine/listener.py",
      "self.read_tracker = self._optional(config.read_timeout,",
      "self.read_tracker = self._optional(config.read_timeout * 1.5,", TIMEOUTS,
      "framed read timeout 1.5x"),
    m("first-data-tripled", "engine/listener.py",
      "self.first_data = self.tracker_class(config.first_data_timeout,",
      "self.first_data = self.tracker_class(config.first_data_timeout * 3,",
      f"{LIMITS} test_proxy_listener.py", "first-data timeout tripled"),
    m("silence-looks-2", "engine/listener.py", "_SILENCE_LOOKS = 4", "_SILENCE_LOOKS = 2",
      TIMEOUTS, "the read-silence check allows 1.5x where the docs say 1.25x"),
    m("silence-never-resets", "engine/listener.py",
      "            conn._read_mark = conn.bytes_in\n            conn._silent_looks = 0",
      "            conn._read_mark = conn.bytes_in", TIMEOUTS,
      "bytes from the peer do not restart the silence count"),
    m("idle-not-restarted-on-send", "engine/connection.py",
      "        self.bytes_out += sent\n        if sent and self._idle is not None:",
      "        self.bytes_out += sent\n        if False and self._idle is not None:",
      TIMEOUTS, "sending does not restart the idle deadline", k=PURE),
    m("idle-not-restarted-on-write", "engine/connection.py",
      "            self.bytes_out += sent\n            if self._idle is not None:\n"
      "                self._idle.start(self)",
      "            self.bytes_out += sent", TIMEOUTS,
      "a write the kernel takes at once does not restart the idle deadline", k=PURE),
    m("write-progress-ignored", "engine/connection.py",
      "            self.listener.write_tracker.start(self)  # progress: the peer is reading",
      "            pass  # progress: the peer is reading", TIMEOUTS,
      "progress does not restart the write deadline", k=PURE),
    # -- admission and the accept policies (listener.py, admission.py) --------------------------
    m("ceiling-off-by-one", "engine/listener.py",
      "            if self.pending_count + self.active_count >= limit:",
      "            if self.pending_count + self.active_count > limit:", LIMITS,
      "one connection past max_connections"),
    m("evict-nothing", "engine/listener.py",
      "        for conn in stale:\n            self.evicted += 1\n"
      "            conn.abort_for(CloseReason.EVICTED)",
      "        for conn in stale:\n            self.evicted += 1", LIMITS,
      "stale pending connections are counted but not closed"),
    m("stale-recheck-late", "engine/listener.py",
      "stale_at = due - self.pending.timeout + self.config.stale_pending_age",
      "stale_at = due - self.pending.timeout + 1.5 * self.config.stale_pending_age", LIMITS,
      "the ceiling is looked at again 1.5x late"),
    m("backoff-no-retry", "engine/listener.py",
      "        core.reactor.call_later(core.config.accept_backoff, retry)",
      "        pass", LIMITS, "after EMFILE accepting never resumes"),
    m("capacity-errors-fatal", "engine/states.py",  # the compiled engine's copy needs a rebuild
      "CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})",
      "CAPACITY_ERRNOS = frozenset({errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})", LIMITS,
      "EMFILE no longer a capacity error", k=None),
    m("raised-ceiling-stays-paused", "engine/listener.py",
      "        if (self._at_ceiling or self._probing) and self.pending_count + self.active_count"
      " < value:", "        if False:", "test_control_socket.py",
      "raising max_connections at run time does not resume accepting", k="compiled"),
    m("client-open-limit-off-by-one", "engine/admission.py",
      "if self.max_open and client.open >= self.max_open:",
      "if self.max_open and client.open > self.max_open:", ADMISSION,
      "one connection per client too many"),
    m("client-rate-ignored", "engine/admission.py",
      "elif self.max_rate and client.rate(now, self.period) + 1 > self.max_rate:",
      "elif False:", ADMISSION, "the rate limit is off"),
    m("client-release-leaks", "engine/admission.py",
      "        if client.open > 0:\n            return",
      "        if client.open >= 0:\n            return", ADMISSION,
      "a client's place is never given back"),
    m("table-never-evicts", "engine/admission.py",
      "                    self._idle.popitem(last=False)\n                    self.evicted += 1",
      "                    self.untracked += 1\n                    return None",
      ADMISSION, "a full table fails open at once"),
    m("proxy-untrusted-accepted", "engine/listener.py",
      "        self.client_refused += 1\n", "        self.client_refused += 0\n",
      "test_admission.py", "client refusals not counted"),
    m("ttfb-bucket-edge", "engine/listener.py",
      "self.ttfb_buckets[bisect.bisect_left(TTFB_BUCKETS, seconds)] += 1",
      "self.ttfb_buckets[bisect.bisect_right(TTFB_BUCKETS, seconds)] += 1",
      "test_compiled_twins.py test_observability.py", "a TTFB equal to a bound lands one up",
      k=None),
    # -- outbound connections (engine/outbound.py) ----------------------------------------------
    m("connect-deadline-1.8x", "engine/outbound.py",
      "self._deadline = reactor.call_later(self.timeout, self._timed_out)",
      "self._deadline = reactor.call_later(self.timeout * 1.8, self._timed_out)",
      "test_connect.py test_relay.py", "the connect deadline stretched 1.8x"),
    m("connect-timeout-not-counted", "engine/outbound.py",
      "            self._connector.timeouts += 1\n", "", "test_connect.py test_relay.py",
      "connect timeouts not counted"),
    m("outbound-idle-not-started", "engine/outbound.py",
      "        if connector.idle_tracker is not None:\n"
      "            connector.idle_tracker.start(conn)",
      "        pass", "test_connect.py", "outbound idle timeout never started"),
    m("outbound-write-off", "engine/outbound.py",
      "self.write_tracker = self._optional(config.write_timeout, CloseReason.WRITE_TIMEOUT,\n"
      "                                            abort=True)",
      "self.write_tracker = None", "test_connect.py", "outbound write timeout never applies"),
    # -- the relay (examples/relay.py) -----------------------------------------------------------
    m("relay-hold-unpaused", "examples/relay.py",
      "        if len(pair.held) >= self.hold_limit and not pair.held_paused:",
      "        if False:", "test_relay.py", "the relay's hold-limit pause removed"),
    m("relay-reset-graceful", "examples/relay.py",
      "        if reason in _ABRUPT:\n            pair.client.abort()\n        else:\n"
      "            pair.client.close()",
      "        pair.client.close()", "test_relay.py",
      "an upstream reset becomes a graceful close of the client"),
    m("relay-no-next-upstream", "examples/relay.py",
      "        if pair.tried <= relay.config.retries:", "        if False:", "test_relay.py",
      "a failed upstream is not followed by the next"),
    m("relay-no-half-close", "examples/relay.py",
      "            pair.upstream.write_eof()\n            pair.finish_if_done()",
      "            pair.finish_if_done()", "test_relay.py", "the client's FIN is not carried",
      k="half_close and epoll"),  # the property test would shrink for minutes on WAITs
    m("relay-no-backpressure", "examples/relay.py",
      "        if pair.upstream is not None:  # the client reads slowly: stop reading the "
      "upstream\n"
      "            pair.upstream.pause_reading()",
      "        pass", "test_relay.py", "a slow client does not pause the upstream"),
    m("relay-held-lost", "examples/relay.py",
      "        if pair.held:\n            conn.write(pair.held)",
      "        if False:\n            conn.write(pair.held)", "test_relay.py",
      "bytes held while connecting are dropped"),
    # -- control: the socket, its directory, its commands (control/*) ---------------------------
    m("control-group-writable", "control/paths.py", "    if info.st_mode & 0o077:",
      "    if info.st_mode & 0o007:", "test_control_socket.py",
      "a group-writable control directory accepted", k="unsafe_directory"),
    m("control-any-uid", "control/server.py", "        if uid not in (os.getuid(), 0):",
      "        if False:", "test_control_socket.py", "any uid may control the server",
      k="another_user"),
    m("control-close-aborts", "control/target.py",
      "        entry = connection_entry(conn, os.getpid())\n        conn.close()",
      "        entry = connection_entry(conn, os.getpid())\n        conn.abort()",
      "test_control_socket.py", "ctl close resets instead of closing", k="epoll"),
    m("control-peer-filter-ignored", "control/target.py",
      "            and (peer is None or peer in entry[\"peer\"]))", "            )",
      "test_control_socket.py", "ctl connections --peer filters nothing", k="epoll"),
    m("control-max-connections-ignored", "control/target.py",
      "            listener.max_connections = value\n", "", "test_control_socket.py",
      "ctl max-connections changes nothing", k="epoll"),
    m("control-pause-all", "control/target.py",
      "            for listener in self._listeners(name):\n                listener.pause()",
      "            self.server.pause_accepting()", "test_control_socket.py test_observability.py",
      "pausing one listener pauses all", k="epoll or single"),
    m("control-drain-accepts", "control/target.py",
      "        self.draining = True\n        self.server.pause_accepting()",
      "        self.draining = True", "test_control_socket.py",
      "ctl drain keeps accepting", k="epoll"),
    m("control-listing-newest-first", "control/target.py",
      "entries.sort(key=lambda entry: -entry[\"age\"])",
      "entries.sort(key=lambda entry: entry[\"age\"])", "test_control_socket.py",
      "ctl connections lists the newest first", k="epoll"),
    # -- metrics: merging workers' figures (statistics.py) --------------------------------------
    m("merge-drops-a-worker", "statistics.py",
      "            merged[name] = sum(values)", "            merged[name] = sum(values[1:])",
      "test_control_socket.py test_observability.py test_connect.py test_workers.py",
      "the merge drops one worker's value", k="workers or figures"),
    m("merge-max-as-sum", "statistics.py", "            merged[name] = max(values)",
      "            merged[name] = sum(values)",
      "test_statistics_declared.py test_observability.py test_control_socket.py",
      "a gauge merged by max is summed", k="workers or declared or merge"),
    m("merge-buckets-first", "statistics.py",
      "merged[name] = [sum(column) for column in zip(*values, strict=True)]",
      "merged[name] = list(values[0])",
      "test_statistics_declared.py test_observability.py test_connect.py",
      "histograms keep the first worker's buckets", k="workers or declared or figures"),
    m("merge-reasons-overwrite", "statistics.py",
      "                    reasons[reason] = reasons.get(reason, 0) + count",
      "                    reasons[reason] = count",
      "test_statistics_declared.py test_observability.py test_connect.py test_control_socket.py",
      "close reasons of workers overwrite each other", k="workers or declared or figures"),
    # -- the compiled twins (_compiled.pyx): each needs a rebuild ---------------------------------
    m("pyx-deadline-1.5x", "engine/_compiled.pyx",
      "        self._due[item] = now + self.timeout",
      "        self._due[item] = now + 1.5 * self.timeout",
      "test_compiled_twins.py test_timeouts.py", "compiled deadlines 1.5x late",
      k="Deadline or Trackers or compiled"),
    m("pyx-expire-inclusive", "engine/_compiled.pyx",
      "            if <double>due > now:", "            if <double>due >= now:",
      "test_compiled_twins.py", "a compiled deadline due now does not expire", k=None),
    m("pyx-tracker-uncounted", "engine/_compiled.pyx",
      "            if self._expire(conn) is not False:\n                self.expired += 1",
      "            if self._expire(conn) is not False:\n                pass",
      "test_compiled_twins.py test_timeouts.py", "compiled expiries not counted",
      k="Trackers or compiled"),
    m("pyx-ttfb-edge", "engine/_compiled.pyx",
      "seconds > <double>bounds[bucket]:", "seconds >= <double>bounds[bucket]:",
      "test_compiled_twins.py", "the compiled TTFB bucket edge moved", k=None),
    m("pyx-buffer-pool-unbounded", "engine/_compiled.pyx",
      "        elif self._free_count + 1 < self.max_free:",
      "        elif True:", "test_compiled_twins.py", "the compiled buffer pool keeps too many",
      k=None),
    m("pyx-buffer-kept-view-reused", "engine/_compiled.pyx",
      "        if buffer.exports > (buffer.lent is not None):",
      "        if False:", "test_compiled_twins.py test_lifecycle.py",
      "a buffer a handler still views is reused", k="BufferPools or (compiled and loan)"),
    m("pyx-object-pool-unbounded", "engine/_compiled.pyx",
      "        if self._free_count < self.max_free and refcount <= UNSHARED_REFCOUNT:",
      "        if refcount <= UNSHARED_REFCOUNT:", "test_compiled_twins.py",
      "the compiled object pool keeps too many", k=None),
)

#: Survivors judged acceptable after a run, with the reason (filled in from results).
ACCEPTABLE: dict[str, str] = {}


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # killed, survived, timeout, broken
    seconds: float
    detail: str = ""


def apply(mutant: Mutant) -> tuple[Path, str]:
    path = SRC / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the snippet occurs {count} times in {mutant.path}")
    path.write_text(text.replace(mutant.old, mutant.new))
    return path, text


def rebuild() -> None:
    """Rebuild the compiled extension in place (after a .pyx mutant, and after undoing it)."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=REPO,
                   check=True, capture_output=True, timeout=900)


def run_tests(mutant: Mutant, timeout: float) -> tuple[str, str]:
    argv = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p",
            "no:cacheprovider", "--timeout", str(int(timeout)),
            *mutant.tests]
    if mutant.k:
        argv += ["-k", mutant.k]
    env = dict(os.environ)
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=env, start_new_session=True)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:g} s"
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode == 0:
        return "survived", tail
    if done.returncode == 5:  # no tests collected: the -k filter chose nothing
        return "broken", "no tests selected"
    return "killed", tail


def check_clean(mutants: list[Mutant]) -> None:
    paths = sorted({f"src/portside/{mutant.path}" for mutant in mutants})
    done = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO,
                          capture_output=True, text=True, check=True)
    if done.stdout.strip():
        raise SystemExit("refusing to mutate files with uncommitted changes:\n" + done.stdout)


def write_results(outcomes: list[Outcome], note: str) -> None:
    judged = [o for o in outcomes if o.verdict != "broken"]
    killed = [o for o in judged if o.verdict in ("killed", "timeout")]
    rate = len(killed) / len(judged) if judged else 0.0
    lines = ["# Mutation testing results", "",
             "`scripts/mutate.py`: each mutant changes one snippet of the source, runs the test "
             "files that cover it (nice 10, one at a time) and is undone. Killed = those tests "
             "failed (or ran out of time); survived = they passed.", "",
             f"{note}", "",
             f"**{len(killed)} of {len(judged)} mutants killed ({rate:.0%})**"
             + (f"; {len(outcomes) - len(judged)} could not be judged" if len(judged) <
                len(outcomes) else "") + ".", "",
             "| mutant | file | what | verdict | seconds |", "|---|---|---|---|---:|"]
    for o in outcomes:
        lines.append(f"| {o.mutant.name} | {o.mutant.path} | {o.mutant.what} | {o.verdict} | "
                     f"{o.seconds:.0f} |")
    survivors = [o for o in outcomes if o.verdict == "survived"]
    lines += ["", "## Survivors", ""]
    if not survivors:
        lines.append("None.")
    for o in survivors:
        reason = ACCEPTABLE.get(o.mutant.name, "not yet judged: a hole in the suite until "
                                "a test catches it or a reason is written here")
        lines.append(f"- **{o.mutant.name}** ({o.mutant.what}): {reason}")
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))


def check_installed_here() -> None:
    """The tests import the installed portside: it must be this tree's, or every mutant would
    survive unseen (an editable install of another checkout, say)."""
    found = subprocess.run([sys.executable, "-c", "import portside; print(portside.__file__)"],
                           capture_output=True, text=True, cwd=REPO / "tests")
    path = Path(found.stdout.strip() or "/nonexistent").resolve()
    if not path.is_relative_to(SRC):
        raise SystemExit(f"the portside the tests import is {path}, not this tree's {SRC}: "
                         "pip install -e . here first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--skip-pyx", action="store_true", help="leave out _compiled.pyx mutants")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per mutant")
    parser.add_argument("--check", action="store_true",
                        help="check every snippet applies exactly once, then stop")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--note", default="", help="a line for the results file (the run's scope)")
    args = parser.parse_args()
    mutants = list(MUTANTS)
    names = [mutant.name for mutant in mutants]
    if len(set(names)) != len(names):
        raise SystemExit("two mutants share a name")
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [mutant for mutant in mutants if mutant.name in wanted]
    if args.skip_pyx:
        mutants = [mutant for mutant in mutants if not mutant.path.endswith(".pyx")]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:32} {mutant.path:24} {mutant.what}")
        return 0
    if args.check:
        for mutant in mutants:
            path, original = apply(mutant)
            path.write_text(original)
            for test in mutant.tests:
                if not (REPO / test).is_file():
                    raise SystemExit(f"{mutant.name}: no test file {test}")
        print(f"{len(mutants)} mutants apply cleanly")
        return 0
    check_clean(mutants)
    check_installed_here()
    # Python mutants first, the .pyx ones last (each rebuilds twice).
    mutants.sort(key=lambda mutant: mutant.path.endswith(".pyx"))
    if any(mutant.path.endswith(".pyx") for mutant in mutants):
        try:
            import Cython  # noqa: F401  (setup.py build_ext needs it outside pip's isolation)
        except ImportError:
            raise SystemExit("the .pyx mutants rebuild in place: pip install 'Cython>=3.0' "
                             "(or pass --skip-pyx)") from None
    outcomes: list[Outcome] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for index, mutant in enumerate(mutants, 1):
            started = time.monotonic()
            path, original = apply(mutant)
            try:
                if mutant.path.endswith(".pyx"):
                    try:
                        rebuild()
                    except subprocess.CalledProcessError as exc:
                        outcomes.append(Outcome(mutant, "broken", time.monotonic() - started,
                                                f"did not build: {exc.stderr[-200:]!r}"))
                        continue
                verdict, detail = run_tests(mutant, args.timeout)
            finally:
                path.write_text(original)
                if mutant.path.endswith(".pyx"):
                    rebuild()  # the real extension back before anything else runs
            outcome = Outcome(mutant, verdict, time.monotonic() - started, detail)
            outcomes.append(outcome)
            print(f"[{index}/{len(mutants)}] {mutant.name}: {verdict} "
                  f"({outcome.seconds:.0f} s) {detail}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: files restored; writing what ran", file=sys.stderr)
    finally:
        write_results(outcomes, args.note)
    judged = [o for o in outcomes if o.verdict != "broken"]
    killed = sum(o.verdict in ("killed", "timeout") for o in judged)
    print(f"{killed}/{len(judged)} killed; results in {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
