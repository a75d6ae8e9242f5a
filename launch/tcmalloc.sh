# Sourced by the launchers (bash): preloads tcmalloc into the Python processes they start.
#
# glibc's malloc gives large freed blocks back to the kernel, so every run of a jitted XLA:CPU
# program faults its temporaries in again, page by page: about 43,000 page faults (178 MB) and
# 0.1 s of kernel time per train step of the default UNet. tcmalloc keeps freed memory for reuse:
# about 100 faults per step and the train step about 1.3x faster (README "Speed"). The Debian
# package is libtcmalloc-minimal4 (launch/local.sh installs it). Where the library is absent
# nothing changes.
#
# Variables: DRC_JAX_TCMALLOC=0 turns it off; TCMALLOC_LIB names the library (default: the
# libtcmalloc_minimal.so.4 of the system's library directories).

drc_jax_tcmalloc_path() {
  if [[ -n ${TCMALLOC_LIB:-} ]]; then
    [[ -e $TCMALLOC_LIB ]] && { echo "$TCMALLOC_LIB"; return 0; }
    echo "tcmalloc.sh: TCMALLOC_LIB=$TCMALLOC_LIB does not exist" >&2
    return 1
  fi
  local f
  for f in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 \
           /usr/lib/libtcmalloc_minimal.so.4; do
    [[ -e $f ]] && { echo "$f"; return 0; }
  done
  return 1
}

# Exports LD_PRELOAD (tcmalloc first) unless turned off, absent or already preloaded.
drc_jax_preload_tcmalloc() {
  [[ ${DRC_JAX_TCMALLOC:-1} == 0 ]] && return 0
  case " ${LD_PRELOAD:-} " in *libtcmalloc*) return 0 ;; esac
  local lib
  lib=$(drc_jax_tcmalloc_path) || return 0
  export LD_PRELOAD="$lib${LD_PRELOAD:+ $LD_PRELOAD}"
  # tcmalloc reports every allocation over 1 GB on stderr (a paper-size checkpoint makes some)
  : "${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:=1099511627776}"
  export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD
}
