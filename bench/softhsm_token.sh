# Sourced by bench/run.sh and bench/profile.sh: one throwaway SoftHSMv2 token for a benchmark.
#
# make_throwaway_token DIR LABEL
#   Creates DIR/tokens and DIR/softhsm2.conf, exports SOFTHSM2_CONF, initialises a token LABEL
#   with random PINs and writes the user PIN to DIR/user.pin (0600). Returns non-zero, with
#   softhsm2-util's output on stderr, when the token cannot be created.
make_throwaway_token() {
  local dir=$1 new_label=$2 user_pin so_pin
  mkdir -p "$dir/tokens"
  export SOFTHSM2_CONF=$dir/softhsm2.conf
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$dir/tokens" >"$SOFTHSM2_CONF"
  # Throwaway PINs of a throwaway token: softhsm2-util takes them only on its command line.
  user_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  so_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077 && printf '%s\n' "$user_pin" >"$dir/user.pin")
  softhsm2-util --init-token --free --label "$new_label" --pin "$user_pin" --so-pin "$so_pin" \
    >"$dir/softhsm2-util.log" 2>&1 || { cat "$dir/softhsm2-util.log" >&2; return 1; }
}
