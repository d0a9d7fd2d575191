"""Run tcia_downloader in-process with per-thread CPU (time.thread_time) accumulated per wrapped
function (inclusive); write a JSON to $BREAKDOWN_OUT at exit."""
import atexit, collections, functools, json, os, resource, sys, threading, time
SRC = sys.argv.pop(1)
sys.path.insert(0, SRC)
acc = collections.defaultdict(float)
calls = collections.Counter()
local = threading.local()
WHOLE_PROCESS = {"TarStreamsTarget.finalize"}

def wrap(owner, name, label):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def w(*a, **k):
        stack = getattr(local, "stack", None)
        if stack is None:
            stack = local.stack = set()
        if label in stack:
            return fn(*a, **k)
        stack.add(label)
        t, whole = time.thread_time(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            acc[label] += time.thread_time() - t
            if label in WHOLE_PROCESS:        # a phase that runs alone, in several threads
                acc[label + " (whole process)"] += time.process_time() - whole
            calls[label] += 1
            stack.discard(label)
    setattr(owner, name, w)

import tcia_dl.sources.idc as idc
import tcia_dl.formats.tarstreams as ts
wrap(idc.S3Client, "download", "s3.download")
wrap(idc.S3Client, "_get", "s3._get (listing)")
wrap(idc.IdcSource, "_checked", "_checked (etag)")
wrap(idc, "dicom_naming_fields", "dicom_naming_fields")
wrap(idc.IdcSource, "_verify_into", "_verify_into (incl. packing)")
wrap(idc.IdcSource, "_listing", "_listing")
wrap(idc.IdcSource, "_download_all", "_download_all (thread issuing)")
wrap(idc.IdcSource, "_download_one", "_download_one (per object)")
wrap(idc.IdcSource, "fetch", "fetch (worker thread)")
for cls_name in dir(ts):
    cls = getattr(ts, cls_name)
    if isinstance(cls, type):
        for meth in ("finalize", "commit", "add"):
            if meth in cls.__dict__:
                wrap(cls, meth, f"{cls_name}.{meth}")

def dump():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {"total": ru.ru_utime + ru.ru_stime, "user": ru.ru_utime, "sys": ru.ru_stime,
           "acc": dict(acc), "calls": dict(calls)}
    with open(os.environ["BREAKDOWN_OUT"], "w") as f:
        json.dump(out, f)
atexit.register(dump)
from tcia_dl.cli import main
t0 = resource.getrusage(resource.RUSAGE_SELF)
acc["startup (imports)"] = t0.ru_utime + t0.ru_stime
rc = main(sys.argv[1:])
dump()
sys.exit(rc)
