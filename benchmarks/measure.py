"""Run one command as a fresh process and measure it from outside.

Wall time, CPU time (user + system, from the kernel's rusage of the child), peak RSS (ru_maxrss, the
kernel's exact high-water mark) and peak anonymous memory (RssAnon in /proc/<pid>/status, sampled
every few milliseconds by a thread of this process, plus the child's own last reading). Anonymous
memory is what a load allocates (copies of weights, the built models); file-backed pages of mmapped
weight files also count in RSS, but the kernel can drop them under pressure without swapping.
"""

import json
import os
import subprocess
import threading
import time

SAMPLE_SECONDS = 0.004


def _status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


class _Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_anon, self.peak_rss, self.samples = pid, 0, 0, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            status = _status(self.pid)
            if status:
                self.samples += 1
                self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
                self.peak_rss = max(self.peak_rss, status.get("VmRSS", 0))
            time.sleep(SAMPLE_SECONDS)


def run(cmd, env=None, cwd=None, timeout=3600):
    """Run cmd (a list) and return {'wall', 'cpu', 'maxrss_kb', 'peak_anon_kb', 'returncode', 'result', 'stderr'};
    'result' is the JSON the command printed on a line starting with 'RESULT ' (None if none)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")
    sampler = _Sampler(proc.pid)
    sampler.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s=s, acc=acc: acc.append(s.read()), daemon=True)
               for s, acc in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    for r in readers:
        r.join()
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    peak_anon = sampler.peak_anon
    if result and "final_status_kb" in result:
        peak_anon = max(peak_anon, result["final_status_kb"].get("RssAnon", 0))
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss,
            "peak_anon_kb": peak_anon, "samples": sampler.samples, "returncode": proc.returncode, "result": result,
            "stderr": stderr}
