"""The launcher's stop signals: a second signal may land at any instruction of the first's
handler (Python runs handlers in the main thread between instructions, nested), and must neither
hang the launcher nor be lost (it is what turns a drain into a kill).

The probe delivers the second signal at instruction 1, 2, 3... of the first handler's run (an
opcode trace), in a child process: it installs handlers, and a hang shows as its timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import signal, sys, threading
    from scalellm.lifecycle import StopSignals

    def stop_signals():
        stop = StopSignals()
        return stop.handle, lambda: stop.count

    def event_pair():  # the launcher's handler before StopSignals
        stopping, force = threading.Event(), threading.Event()
        def handle(*_):
            if stopping.is_set():
                force.set()
            stopping.set()
        return handle, lambda: stopping.is_set() + force.is_set()

    make = {"stop_signals": stop_signals, "event_pair": event_pair}[sys.argv[1]]
    k = 0
    while True:
        handle, count = make()
        signal.signal(signal.SIGUSR1, handle)
        signal.signal(signal.SIGUSR2, handle)
        seen, fired = [0], [False]

        def tracer(frame, event, arg):
            frame.f_trace_opcodes = True
            if event == "opcode":
                seen[0] += 1
                if seen[0] == k + 1:
                    fired[0] = True
                    signal.raise_signal(signal.SIGUSR2)  # its handler runs here, inside the first
            return tracer

        sys.settrace(tracer)
        signal.raise_signal(signal.SIGUSR1)
        sys.settrace(None)
        if not fired[0]:
            break
        if count() != 2:
            sys.exit(f"second signal at instruction {k}: {count()} counted")
        k += 1
    print(k)
    """
)


def run_probe(handler: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, handler], capture_output=True, text=True, timeout=60)


def test_a_second_stop_signal_at_any_instruction_of_the_first_is_counted() -> None:
    result = run_probe("stop_signals")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 1  # instructions probed


def test_the_probe_catches_a_handler_that_sets_threading_events() -> None:
    """Event.set takes a lock: a nested signal is lost, or (a few instructions on) deadlocks."""
    result = run_probe("event_pair")
    assert result.returncode != 0
    assert "counted" in result.stderr
