#!/usr/bin/env bash
# Download and unpack one of the LAION-Aesthetics V2 subsets published by
# Nota's BK-SDM project (image folders + metadata.csv with file_name,text).
#
#   bash scripts/get_laion_data.sh SUBSET [DEST_DIR]
#
#   SUBSET    preprocessed_11k    ~10k pairs,  aesthetic score 6.5+  (~1.7 GB tar.gz)
#             preprocessed_212k   ~213k pairs, aesthetic score 6.5+  (~18 GB tar.gz)
#             preprocessed_2256k  ~2.26M pairs, aesthetic score 6.25+ (~182 GB tar.gz)
#   DEST_DIR  where <SUBSET>.tar.gz and <SUBSET>/ go (default: $DATA_DIR or data/)
#
# Environment:
#   DATA_DIR              default destination when DEST_DIR is not given (data)
#   LAION_DATA_URL        full URL of the archive (overrides everything below)
#   LAION_DATA_BASE_URL   directory URL; the archive is fetched from $LAION_DATA_BASE_URL/<SUBSET>.tar.gz
#   LAION_DOWNLOADER      curl or wget (default: curl if installed, else wget)
#   LAION_CONNECT_TIMEOUT seconds to wait for a connection (default 20)
#   LAION_DELETE_ARCHIVE  1 = delete the .tar.gz after a successful unpack (default 0: keep it)
#
# The download goes to <SUBSET>.tar.gz.part and is resumed on a rerun; it is
# renamed to <SUBSET>.tar.gz once complete. The archive is unpacked into a
# temporary directory next to the destination and moved into place only when
# tar succeeded, so <DEST_DIR>/<SUBSET>/ is either complete or absent.
# Needs only bash, curl (or wget), tar and python3.
set -euo pipefail

PROG="get_laion_data.sh"
S3_ROOT="https://netspresso-research-code-release.s3.us-east-2.amazonaws.com/data"

usage() {
    echo "usage: bash scripts/$PROG preprocessed_11k|preprocessed_212k|preprocessed_2256k [DEST_DIR]"
}

die() {
    echo "error: $*" >&2
    exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    usage >&2
    exit 2
fi

SUBSET="$1"
case "$SUBSET" in
    -h|--help)
        usage
        exit 0
        ;;
    preprocessed_11k|preprocessed_212k)
        DEFAULT_BASE="$S3_ROOT/improved_aesthetics_6.5plus"
        ;;
    preprocessed_2256k)
        DEFAULT_BASE="$S3_ROOT/improved_aesthetics_6.25plus"
        ;;
    *)
        echo "error: unknown subset '$SUBSET'" >&2
        usage >&2
        exit 2
        ;;
esac

DEST="${2:-${DATA_DIR:-data}}"
DEST="${DEST%/}"
[ -n "$DEST" ] || DEST="/"
NAME="$SUBSET.tar.gz"
if [ -n "${LAION_DATA_URL:-}" ]; then
    URL="$LAION_DATA_URL"
else
    BASE="${LAION_DATA_BASE_URL:-$DEFAULT_BASE}"
    URL="${BASE%/}/$NAME"
fi
TARGET="$DEST/$SUBSET"
ARCHIVE="$DEST/$NAME"
PART="$ARCHIVE.part"
CONNECT_TIMEOUT="${LAION_CONNECT_TIMEOUT:-20}"
MAX_ATTEMPTS=5   # download attempts per run (each resumes the .part)
RETRY_DELAY=5    # seconds between attempts

command -v tar >/dev/null 2>&1 || die "tar is required but not installed"
command -v python3 >/dev/null 2>&1 || die "python3 is required but not installed"

# ---------------------------------------------------------------- counting --
count_pairs() {
    # Prints "<images> <captions>" and, on stderr, warnings about metadata.csv.
    python3 - "$1" <<'PY'
import csv, os, sys

root = sys.argv[1]
exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
images = 0
csvs = []
for d, _, files in os.walk(root):
    for f in files:
        if f == "metadata.csv":
            csvs.append(os.path.join(d, f))
        elif os.path.splitext(f)[1].lower() in exts:
            images += 1
captions = 0
if not csvs:
    print(f"warning: no metadata.csv found under {root}", file=sys.stderr)
for path in sorted(csvs):
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        missing = [c for c in ("file_name", "text") if c not in header]
        if missing:
            print(f"warning: {path} lacks column(s) {','.join(missing)} (header: {','.join(header)})",
                  file=sys.stderr)
        captions += sum(1 for row in reader if row)
print(images, captions)
PY
}

report_counts() {
    local counts images captions
    counts="$(count_pairs "$TARGET")" || die "could not count the files in $TARGET"
    read -r images captions <<<"$counts"
    echo "$SUBSET: $images images, $captions captions (rows of metadata.csv) in $TARGET"
    if [ "$images" != "$captions" ]; then
        echo "warning: $images images but $captions captions in $TARGET" >&2
    fi
}

# ------------------------------------------------------------ already done --
if [ -d "$TARGET" ]; then
    echo "$SUBSET is already there: $TARGET (delete that directory to unpack it again); nothing to do"
    exit 0
fi

mkdir -p "$DEST" || die "cannot create destination directory $DEST"

# ---------------------------------------------------------------- download --
part_size() {
    if [ -f "$PART" ]; then wc -c <"$PART" | tr -d ' '; else echo 0; fi
}

unreachable() {
    # an empty .part left by a failed connection is useless
    if [ -f "$PART" ] && [ ! -s "$PART" ]; then rm -f "$PART"; fi
    die "cannot reach $URL (offline?): download $NAME elsewhere and put it in $DEST, then rerun"
}

download_curl() {
    local attempt=1 restarted=0 rc code before progress=(-s)
    if [ -t 2 ]; then progress=(--progress-bar); fi
    while :; do
        rc=0
        before="$(part_size)"
        code="$(curl "${progress[@]}" -f -L -C - -o "$PART" -w '%{http_code}' \
            --connect-timeout "$CONNECT_TIMEOUT" --speed-limit 1024 --speed-time 120 \
            "$URL")" || rc=$?
        case "$rc" in
            0)
                return 0
                ;;
            5|6|7)
                unreachable
                ;;
            22)
                # 416 to a resume request: the .part already holds the whole file
                if [ "$code" = "416" ] && [ -s "$PART" ]; then return 0; fi
                die "server answered HTTP $code for $URL: check LAION_DATA_URL / LAION_DATA_BASE_URL, or download $NAME elsewhere and put it in $DEST, then rerun"
                ;;
            33)
                # the server ignores Range requests: start over (once is enough)
                if [ "$restarted" = 1 ]; then
                    die "download of $URL failed (curl exit $rc): rerun to try again"
                fi
                echo "warning: the server cannot resume; restarting the download of $NAME from scratch" >&2
                rm -f "$PART"
                restarted=1
                continue
                ;;
            18|28|35|52|55|56|92)
                # nothing arrived at all: treat as unreachable, else retry/resume
                if [ "$(part_size)" = "$before" ] && [ "$rc" != 18 ]; then unreachable; fi
                ;;
            *)
                die "download of $URL failed (curl exit $rc): rerun to resume"
                ;;
        esac
        attempt=$((attempt + 1))
        if [ "$attempt" -gt "$MAX_ATTEMPTS" ]; then
            die "download of $URL keeps failing (curl exit $rc): rerun to resume from $PART"
        fi
        echo "warning: download interrupted (curl exit $rc); resuming, attempt $attempt/$MAX_ATTEMPTS" >&2
        sleep "$RETRY_DELAY"
    done
}

download_wget() {
    local rc=0 before
    before="$(part_size)"
    local progress=(-q)
    if [ -t 2 ]; then progress=(-q --show-progress); fi
    wget "${progress[@]}" -c -O "$PART" --connect-timeout="$CONNECT_TIMEOUT" \
        --read-timeout=120 --tries="$MAX_ATTEMPTS" --waitretry="$RETRY_DELAY" "$URL" || rc=$?
    case "$rc" in
        0) return 0 ;;
        4)
            if [ "$(part_size)" = "$before" ]; then unreachable; fi
            die "download of $URL interrupted (wget exit $rc): rerun to resume"
            ;;
        8)
            die "server answered an HTTP error for $URL: check LAION_DATA_URL / LAION_DATA_BASE_URL, or download $NAME elsewhere and put it in $DEST, then rerun"
            ;;
        *)
            die "download of $URL failed (wget exit $rc): rerun to resume"
            ;;
    esac
}

if [ -f "$ARCHIVE" ]; then
    echo "using existing archive $ARCHIVE"
else
    DOWNLOADER="${LAION_DOWNLOADER:-}"
    if [ -z "$DOWNLOADER" ]; then
        if command -v curl >/dev/null 2>&1; then DOWNLOADER=curl
        elif command -v wget >/dev/null 2>&1; then DOWNLOADER=wget
        else die "neither curl nor wget is installed"
        fi
    fi
    command -v "$DOWNLOADER" >/dev/null 2>&1 || die "$DOWNLOADER is not installed"
    if [ -s "$PART" ]; then
        echo "resuming $URL -> $PART (have $(part_size) bytes)"
    else
        echo "downloading $URL -> $PART"
    fi
    case "$DOWNLOADER" in
        curl) download_curl ;;
        wget) download_wget ;;
        *) die "LAION_DOWNLOADER must be curl or wget, not '$DOWNLOADER'" ;;
    esac
    [ -s "$PART" ] || die "download of $URL produced no data"
    mv -f "$PART" "$ARCHIVE"
    echo "downloaded $ARCHIVE ($(wc -c <"$ARCHIVE" | tr -d ' ') bytes)"
fi

# ------------------------------------------------------------------ unpack --
TMP="$(mktemp -d "$DEST/.$SUBSET.unpack.XXXXXX")" || die "cannot create a temporary directory in $DEST"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "unpacking $ARCHIVE (this can take a while for the large subsets)"
tar -xzf "$ARCHIVE" -C "$TMP" --no-same-owner ||
    die "unpacking $ARCHIVE failed (corrupt or incomplete archive, or disk full?): delete it and rerun"

# The archives hold a top-level <SUBSET>/ directory; accept any single
# top-level directory, or files without one.
shopt -s nullglob dotglob
entries=("$TMP"/*)
shopt -u nullglob dotglob
if [ -d "$TMP/$SUBSET" ]; then
    SRC="$TMP/$SUBSET"
elif [ "${#entries[@]}" -eq 1 ] && [ -d "${entries[0]}" ]; then
    SRC="${entries[0]}"
elif [ "${#entries[@]}" -gt 0 ]; then
    SRC="$TMP"
else
    die "$ARCHIVE is empty"
fi
[ ! -e "$TARGET" ] || die "$TARGET appeared while unpacking (another run?); leaving it alone"
mv "$SRC" "$TARGET"
echo "unpacked to $TARGET"

if [ "${LAION_DELETE_ARCHIVE:-0}" = "1" ]; then
    rm -f "$ARCHIVE"
    echo "deleted $ARCHIVE"
fi

report_counts
