"""Run a command and report its host memory: the peak of RssAnon, RssFile and VmRSS (sampled
from /proc every 0.1 s) and VmHWM at the end, in GiB, as one JSON line on stderr.
Usage: python bench/peak_rss.py COMMAND..."""
import json
import subprocess
import sys
import time


def main():
    proc = subprocess.Popen(sys.argv[1:])
    peak = {}   # field -> the most bytes seen
    t = time.time()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                        peak[key] = max(peak.get(key, 0), int(value.split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    rc = proc.wait()
    row = {f"peak_{k}_gib": round(v / 2**30, 2) for k, v in peak.items()}
    print(json.dumps(dict(row, rc=rc, wall_s=round(time.time() - t, 1))), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
