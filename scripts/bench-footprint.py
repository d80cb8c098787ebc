#!/usr/bin/env python3
"""Measures the daemon's footprint on one model file and prints a Markdown
table: RSS (total, anonymous, file-backed) at idle after start, after a
100-token chat, during a ~2000-token request (peak) and after it finished;
idle CPU over 60 s; time to READY=1 and to a first answer, cold (page cache
dropped, needs root; also with the request coming LATE_S after READY) and
warm, for each `prefetch` mode; binary sizes.

usage: scripts/bench-footprint.sh MODEL.gguf   (builds the release binary first)
       python3 scripts/bench-footprint.py CRYSTALD MODEL.gguf

Environment: THREADS (default: crystald's), IDLE_S [60], LONG_TOKENS [2000],
MODES [off,background,wait], COLD [1] (0: skip the cold-start runs), REPS [3]
(starts per mode and page-cache state; medians), LATE_S [5] (how long after
READY=1 the "asked later" row's request comes), PREFETCH [off] (the mode of
the memory run), START_ONLY [0] (1: only the start-up table).
"""
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

crystald, model = sys.argv[1], sys.argv[2]
threads = os.environ.get("THREADS")
idle_s = float(os.environ.get("IDLE_S", "60"))
long_tokens = int(os.environ.get("LONG_TOKENS", "2000"))
modes = os.environ.get("MODES", "off,background,wait").split(",")
cold = os.environ.get("COLD", "1") == "1"
reps = int(os.environ.get("REPS", "3"))
late_s = float(os.environ.get("LATE_S", "5"))
start_only = os.environ.get("START_ONLY", "0") == "1"
tmp = tempfile.mkdtemp(prefix="crystald-footprint-")
atexit.register(shutil.rmtree, tmp, True)
clk = os.sysconf("SC_CLK_TCK")


def mib(b):
    return f"{b / (1 << 20):.0f} MiB"


def rss(pid):
    f = {}
    with open(f"/proc/{pid}/status") as s:
        for line in s:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                f[k] = int(v.split()[0]) * 1024
    return f


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as s:
        fields = s.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wakeups(pid):
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/status") as s:
            for line in s:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    return n


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Daemon:
    def __init__(self, prefetch="off"):
        self.sock = os.path.join(tmp, "d.sock")
        notify = os.path.join(tmp, "notify")
        if os.path.exists(notify):
            os.unlink(notify)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify)
        cfg = os.path.join(tmp, "empty.toml")
        open(cfg, "w").close()
        cmd = [crystald, "serve", "--config", cfg, "--model", model, "--socket", self.sock,
               "--prefetch", prefetch]
        if threads:
            cmd += ["--threads", threads]
        self.log = open(os.path.join(tmp, f"serve-{prefetch}.log"), "w")
        env = dict(os.environ, NOTIFY_SOCKET=notify)
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stderr=self.log, env=env)
        while True:
            self.notify.settimeout(600)
            msg = self.notify.recv(4096).decode()
            if "READY=1" in msg:
                self.ready_s = time.monotonic() - self.t0
                break

    def ask(self, req, sample=None):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(self.sock)
        c.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        c.settimeout(0.5)
        while b"\n" not in buf:
            try:
                chunk = c.recv(65536)
            except socket.timeout:
                if sample:
                    sample()
                continue
            if not chunk:
                raise RuntimeError("daemon closed the connection")
            buf += chunk
        c.close()
        return json.loads(buf.split(b"\n")[0])

    def stop(self):
        self.p.terminate()
        self.p.wait(60)
        self.notify.close()
        self.log.close()


def quiet_rss(d):
    # The worker gives memory back once it is idle; let it.
    time.sleep(1.0)
    return rss(d.p.pid)


rows = []
start_rows = []
one_token = {"id": 0, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
for mode in modes:
    for kind in (["cold", f"cold, asked {late_s:.0f} s after READY"] if cold else []) + ["warm"]:
        ready, first = [], []
        for _ in range(reps):
            if kind.startswith("cold"):
                drop_caches()
            else:
                subprocess.run(["cat", model], stdout=subprocess.DEVNULL, check=True)
            d = Daemon(mode)
            t = d.t0
            if kind.startswith("cold,"):
                # A request that comes a while after start: what the wait did.
                time.sleep(late_s)
                t = time.monotonic()
            d.ask(one_token)
            first.append(time.monotonic() - t)
            ready.append(d.ready_s)
            m = rss(d.p.pid)
            d.stop()
        start_rows.append((mode, kind, sorted(ready)[reps // 2], sorted(first)[reps // 2], m))

def main_run():
    global idle_cpu, idle_wakeups
    prefetch = os.environ.get("PREFETCH", "off")
    d = Daemon(prefetch)
    rows.append(("idle after start", quiet_rss(d), ""))
    before = (cpu_ticks(d.p.pid), wakeups(d.p.pid))
    time.sleep(idle_s)
    after = (cpu_ticks(d.p.pid), wakeups(d.p.pid))
    idle_cpu = (after[0] - before[0]) / clk
    idle_wakeups = after[1] - before[1]

    chat = {"id": 1, "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
            "max_tokens": 100, "temperature": 0}
    r = d.ask(chat)
    u = r["usage"]
    rows.append(("after a 100-token chat", quiet_rss(d),
                 f'{u["prompt_tokens"]} prompt + {u["completion_tokens"]} generated'))
    words = " ".join(f"word{i}" for i in range(long_tokens))
    peak = {}

    def sample():
        now = rss(d.p.pid)
        if now["RssAnon"] > peak.get("RssAnon", 0):
            peak.update(now)

    # Sized by tokens: cut the text until it tokenizes to just under the target.
    def n_tokens(text):
        out = subprocess.run([crystald, "tokenize", "-m", model, "--text", text],
                             capture_output=True, text=True, check=True)
        return len(json.loads(out.stdout))

    target = long_tokens - 16 - 1  # room for the reply and <s>
    all_words = words.split()
    k = len(all_words)
    for _ in range(4):
        n = n_tokens(" ".join(all_words[:k]))
        if target - 8 <= n <= target:
            break
        k = int(k * target / n)
    words = " ".join(all_words[:k])
    long_req = {"id": 2, "prompt": words, "max_tokens": 16, "temperature": 0}
    t = time.monotonic()
    r = d.ask(long_req, sample)
    long_s = time.monotonic() - t
    sample()
    u = r["usage"]
    rows.append((f"during a {u['prompt_tokens'] + u['completion_tokens']}-token request (peak)", peak,
                 f'{u["prompt_tokens"]} prompt + {u["completion_tokens"]} generated, {long_s:.0f} s'))
    rows.append(("after it finished", quiet_rss(d), ""))
    d.stop()


if not start_only:
    main_run()

la = open("/proc/loadavg").read().split()[:3]
print(f"model {model} ({os.path.getsize(model) / (1 << 30):.2f} GiB), load average {' '.join(la)}")
if not start_only:
    print()
    print("| daemon state | RSS total | anonymous | file-backed | notes |")
    print("|---|---|---|---|---|")
    for name, m, note in rows:
        print(f"| {name} | {mib(m['VmRSS'])} | {mib(m['RssAnon'])} | {mib(m['RssFile'])} | {note} |")
    print()
    print(f"Idle CPU over {idle_s:.0f} s: {idle_cpu:.2f} s ({100 * idle_cpu / idle_s:.2f} %), "
          f"{idle_wakeups} context switches of all threads")
print()
print(f"Median of {reps} starts each:")
print()
print("| prefetch | page cache | time to READY=1 | time to first answer (1 token; from the start, or from the request when asked later) | RSS file-backed after |")
print("|---|---|---|---|---|")
for mode, kind, ready, first, m in start_rows:
    print(f"| {mode} | {kind} | {ready:.2f} s | {first:.2f} s | {mib(m['RssFile'])} |")
print()
print("| binary | size | stripped |")
print("|---|---|---|")
for b in [crystald, os.path.join(os.path.dirname(crystald), "crystal-quantize")]:
    if os.path.exists(b):
        s = os.path.join(tmp, "stripped")
        subprocess.run(["strip", "-o", s, b], check=True)
        print(f"| {os.path.basename(b)} | {mib(os.path.getsize(b))} | {mib(os.path.getsize(s))} |")
