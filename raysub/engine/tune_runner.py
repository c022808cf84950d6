"""The Tune runner `raysub sweep` and `raysub l2o tune` share: a Ctrl-C that stops Tune gracefully (the experiment
state saved, so ``--resume`` continues) and then raises KeyboardInterrupt, and the resources of a trial's driver.
"""
from __future__ import annotations

import os
import signal
import threading

# A DDP trial's own Tune actor only waits on its TorchTrainer: it reserves no CPU (so the Train workers always
# fit and no trial can starve another's workers), and one byte of memory, since Tune refuses an empty bundle.
DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


def fit_tuner(tuner):
    """``tuner.fit()``; raises KeyboardInterrupt when Ctrl-C stopped it.

    Tune's own SIGINT handler stops fit gracefully (it saves the experiment state, so ``--resume`` continues)
    but then returns as if the experiment had ended: the stopped trials read TERMINATED, like those ASHA stops,
    and the trials not yet started are missing. So Tune's SIGINT handler is switched off
    (TUNE_DISABLE_SIGINT_HANDLER) and ours records the interrupt and sends SIGUSR1, Tune's other stop signal,
    which stops it the same way; a second Ctrl-C raises KeyboardInterrupt at once, as with Tune's. Off the main
    thread no handler can be installed (Tune installs none either) and fit runs as it is.
    """

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return tuner.fit()
    interrupted = []
    previous = signal.getsignal(signal.SIGINT)
    previous_usr1 = signal.getsignal(signal.SIGUSR1)

    def not_yet(signum, frame):  # SIGUSR1 before Tune installs its handler must not kill the process
        pass

    def on_sigint(signum, frame):
        # a second Ctrl-C (Tune's SIGUSR1 handler puts this one back), or one before Tune listens: stop at once
        if interrupted or signal.getsignal(signal.SIGUSR1) is not_yet:
            raise KeyboardInterrupt
        interrupted.append(signum)
        signal.raise_signal(signal.SIGUSR1)

    key = "TUNE_DISABLE_SIGINT_HANDLER"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    signal.signal(signal.SIGUSR1, not_yet)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        grid = tuner.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved
    if interrupted:
        raise KeyboardInterrupt
    return grid
