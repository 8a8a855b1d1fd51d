# Sourced by scripts/test.sh and scripts/test-extra.sh: each stage's duration, printed when it
# ends and again, all together with the total, when the run ends (pass or fail), so that CI's
# 40-minute budget is visible in every run's last lines.
#   stage_done NAME        after a stage: prints "(NAME: N s)" and records it
#   stage_summary          prints the recorded stages and the total (test.sh calls it on exit)
# The record is the file $HSM_STAGE_TIMES, shared with the scripts test.sh calls.
if [[ -z "${HSM_STAGE_TIMES:-}" ]]; then
  HSM_STAGE_TIMES=$(mktemp)
  export HSM_STAGE_TIMES HSM_STAGE_TIMES_OWNER=$$
fi
stage_started=$SECONDS
stage_done() {
  local took=$((SECONDS - stage_started))
  printf '(%s: %d s)\n' "$1" "$took"
  printf '%s %d\n' "$1" "$took" >>"$HSM_STAGE_TIMES"
  stage_started=$SECONDS
}
stage_summary() {
  local status=$1 total=0 name took
  printf '\n==== stage times (%s) ====\n' "$([[ $status == 0 ]] && echo passed || echo "FAILED, exit $status")"
  while read -r name took; do
    printf '  %-14s %5d s\n' "$name" "$took"
    total=$((total + took))
  done <"$HSM_STAGE_TIMES"
  printf '  %-14s %5d s (%d min; budget 40 min)\n' total "$total" $((total / 60))
  [[ "${HSM_STAGE_TIMES_OWNER:-}" == "$$" ]] && rm -f "$HSM_STAGE_TIMES"
}
