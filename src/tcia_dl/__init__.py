"""tcia_downloader: a TCIA collection becomes one verified, kill-safe .tar.xz.

Downloads every series of a collection from TCIA's NBIA v4 REST API, verifies each
DICOM file against the server's MD5 list, drops files that do not belong to the
series, names folders by patient, study date and description, and appends each
finished series to a .tar.xz (or .tar.zst) as an independent compressed unit, or
moves it into a folder tree. A journal next to the
archive records every committed series after fsync, so a kill at any instant loses
no finished work and a rerun continues where the last one stopped.

The package tcia_dl (`python -m tcia_dl` runs cli.main):
  A run, in the order a series travels:
    cli                the command line: the parser, the checks of every flag, main()
    run                a run: source and output opened, the plan, workers, one series from
                       first attempt to commit, stops, the report
    pipeline           the bounds of the download/pack pipeline: connections (--workers),
                       scratch (--temp-limit)
    plan               which series, and where each goes: records, names, the manifests'
                       series (and the .failed.tcia/.damaged.tcia written), shards, updates, space
    manifests          the files --manifest reads (.tcia, IDC's s5cmd, CSV/TSV), told by
                       their content; IDC's uuids mapped to SeriesInstanceUIDs
    sources.base       the source contract: SourceEntry (a --mode), Source, Selected,
                       AttemptBytes, Member, VerifiedSeries, MemberSink, Packing
    sources.nbia_api   NBIA v4's REST client: tokens, TciaApi, getImage
    sources.nbia       NBIA as a source: NbiaSource, and a series' zip verified file by file
    sources.zipstream  a series zip read front to back while it downloads (a big series is
                       verified and packed as it arrives)
    sources.idc_index  IDC's offline index (duckdb over parquet) and its records
    sources.idc        IDC as a source: its public S3 buckets (S3Client), IdcSource
    sources.auto       --mode auto: IDC first, NBIA for what IDC lacks or fails
    sources.ascli      IBM's ascli, run for --mode aspera: where it is, the command lines,
                       one run of it in its own process group, its JSON, its error lines
    sources.aspera_package  a Faspex package as files: its link, listing and root .sums,
                       safe paths, the parts it is received in
    sources.aspera     --mode aspera: the flags, settings and AsperaSource (a part per
                       record: received, checked against the .sums, packed)
    sources.registry   the sources --mode chooses from, one entry each
    dicom              the DICOM header reader and the naming check
    formats            the format registry (--format): FORMATS, the codec of an archive
    formats.base       the output contract: Target (a format, and an output being written),
                       Codec (an archive's independent compressed units), Prepared
    formats.tarstreams an archive as a tar split into one compressed unit per series,
                       appended after fsync (codec-neutral)
    formats.xz         the xz codec (streams found from their footers and indexes,
                       decompressed to their span) and --format tar.xz
    formats.zstd       the zstd codec (frames found by walking their block headers) and
                       --format tar.zst
    formats.tree       --format dir: the folder tree
    journal            the journal beside an output: what is committed, written and read
    collection_files   LICENSE, metadata.csv, MD5SUMS, CITATION.md, the DOI resolver
  Checking and using an output (--verify, --extract):
    findings           what a check found: its problem lines, its ledger of members (on
                       disk), its findings
    tarread            tar members as GNU tar reads them, from a stream's fragment; the
                       collection files (MD5SUMS, metadata.csv) read back; a stream checked
    trust              the journal --verify and --extract believe (one that describes the
                       file beside it), and what they read from it
    verify             --verify, and the repair lists of a damaged output
    extract            --extract: (part of) an archive into a folder tree
  Shared by all of them:
    settings           what a run is asked to do (Selection, NetworkSettings, Options,
                       Shard), shared defaults
    errors             exit codes, the exception classes (one root), what a failed request
                       means
    logs               logging (secrets kept out), the progress line, printable, human_bytes
    net                HTTP: the retry policy, the transfer watchdog, watched sessions
    storage            locks, scratch files, fsync, reading a range, a full disk
    memory             glibc's malloc told to reuse large freed blocks (a run sets it once)
    inflate            a zip entry inflated and checked (python-isal if installed, else zlib)

Exit codes (documented in the README):
    0    every requested series is in the output and verified
    1    some series failed; the archive stays <name>.tar.xz.part and a rerun resumes it
    2    bad usage or input (flags, unknown collection, rejected credentials, busy output)
    75   stopped early on SIGUSR1 (slurm's warning before a time limit): what finished is
         committed, work remains; rerun (the sbatch template requeues itself)
    130  interrupted by SIGINT (Ctrl-C)       143  terminated by SIGTERM
"""

__version__ = "0.4.0"
