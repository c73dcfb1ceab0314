#!/usr/bin/env bash
# End-to-end test of the windowed example game (Coin Grid) under a virtual X server.
#
# Builds the game, starts it under Xvfb (rendering through Mesa's software Vulkan driver),
# plays a few steps with xdotool, saves to the quick slot (F5), quits (Esc, which autosaves),
# starts it again (it resumes that autosave), loads the quick slot (F9) and checks that the
# loaded score and position are the saved ones. Leaves a screenshot of the second run in
# examples/windowed/screenshot.png. Every wait is bounded; any failure exits non-zero.
#
# Needs (Debian/Ubuntu): apt-get install -y libwayland-dev libudev-dev libxkbcommon-dev \
#   pkg-config xvfb mesa-vulkan-drivers xdotool imagemagick
# plus the X11 libraries winit loads at run time (usually already there):
#   libxkbcommon-x11-0 libxcursor1 libxrandr2 libxi6 libx11-xcb1
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/windowed
screenshot="$here/screenshot.png"

# ---------------------------------------------------------------------------- tools
missing=()
for tool in cargo Xvfb xdotool import identify pkg-config; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! pkg-config --exists xkbcommon 2>/dev/null; then missing+=("libxkbcommon-dev"); fi
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  missing+=("mesa-vulkan-drivers (lavapipe)")
fi
# Loaded by winit and wgpu with dlopen, so the build does not catch their absence.
ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
libs="$("$ldconfig" -p 2>/dev/null || true)"
for lib in libxkbcommon-x11.so.0 libXcursor.so.1 libXrandr.so.2 libXi.so.6 libX11-xcb.so.1 libvulkan.so.1; do
  grep -qF "$lib" <<<"$libs" || missing+=("$lib")
done
if ((${#missing[@]})); then
  echo "run_test.sh: missing: ${missing[*]}" >&2
  echo "install with: apt-get install -y libwayland-dev libudev-dev libxkbcommon-dev pkg-config" \
    "xvfb mesa-vulkan-drivers xdotool imagemagick" \
    "libxkbcommon-x11-0 libxcursor1 libxrandr2 libxi6 libx11-xcb1 libvulkan1" >&2
  exit 1
fi

# ---------------------------------------------------------------------------- build
echo "== build (cargo build -p windowed_game)"
cargo build -p windowed_game
game="${CARGO_TARGET_DIR:-target}/debug/windowed_game"
[[ -x "$game" ]] || { echo "run_test.sh: no binary at $game" >&2; exit 1; }

# ---------------------------------------------------------------------------- setup
work="$(mktemp -d)"
save="$work/saves.db"
xvfb_pid=""
game_pid=""
current_log=""

cleanup() {
  local status=$?
  if [[ -n "$game_pid" ]] && kill -0 "$game_pid" 2>/dev/null; then
    kill "$game_pid" 2>/dev/null || true
    sleep 0.5
    kill -9 "$game_pid" 2>/dev/null || true
  fi
  if [[ -n "$xvfb_pid" ]]; then
    kill "$xvfb_pid" 2>/dev/null || true
    wait "$xvfb_pid" 2>/dev/null || true
  fi
  if ((status != 0)) && [[ -n "$current_log" ]]; then
    echo "---- game stdout ($current_log)" >&2
    tail -n 30 "$current_log" >&2 || true
    echo "---- game stderr" >&2
    tail -n 30 "$current_log.err" >&2 || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# A display number no other X server uses.
display=""
for n in $(seq 99 140); do
  if [[ ! -e "/tmp/.X11-unix/X$n" && ! -e "/tmp/.X$n-lock" ]]; then
    display=":$n"
    break
  fi
done
[[ -n "$display" ]] || fail "no free X display number between :99 and :140"

echo "== Xvfb on $display"
Xvfb "$display" -screen 0 1024x768x24 -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
export DISPLAY="$display"
for _ in $(seq 1 100); do
  timeout 5 xdotool getdisplaygeometry >/dev/null 2>&1 && break
  kill -0 "$xvfb_pid" 2>/dev/null || fail "Xvfb exited: $(cat "$work/xvfb.log")"
  sleep 0.1
done
timeout 5 xdotool getdisplaygeometry >/dev/null 2>&1 || fail "Xvfb did not answer within 10 s"

# Software rendering: Mesa's lavapipe through Vulkan.
export WGPU_BACKEND=vulkan
export RUST_LOG="${RUST_LOG:-warn}"

# ---------------------------------------------------------------------------- helpers

# start_game LOG: starts the game on the temp save file, logging to LOG and LOG.err.
start_game() {
  current_log="$1"
  "$game" --save "$save" >"$current_log" 2>"$current_log.err" &
  game_pid=$!
}

# wait_line REGEX SECONDS: waits for a line of the game's stdout; prints it.
wait_line() {
  local regex="$1" deadline=$((SECONDS + $2)) line
  while ((SECONDS < deadline)); do
    if line="$(grep -m1 -E "$regex" "$current_log")"; then
      echo "$line"
      return 0
    fi
    kill -0 "$game_pid" 2>/dev/null || fail "the game exited before printing /$regex/"
    sleep 0.2
  done
  fail "no line matching /$regex/ within $2 s"
}

# wait_window SECONDS: waits for the game's window to be mapped; sets $window.
wait_window() {
  window="$(timeout "$1" xdotool search --sync --onlyvisible --name 'Coin Grid' | head -n1)" ||
    fail "no 'Coin Grid' window within $1 s"
  [[ -n "$window" ]] || fail "no 'Coin Grid' window within $1 s"
  # No window manager under Xvfb: give the window the keyboard focus ourselves.
  timeout 10 xdotool windowfocus --sync "$window" 2>/dev/null ||
    timeout 10 xdotool windowfocus "$window" || fail "cannot focus the game window"
  timeout 10 xdotool mousemove --window "$window" 300 300 || fail "cannot move the pointer"
}

# keys KEY...: types keys into the focused game window, 150 ms apart.
keys() {
  timeout 30 xdotool key --delay 150 "$@"
}

# wait_exit SECONDS: waits for the game to exit by itself with status 0.
wait_exit() {
  local deadline=$((SECONDS + $1))
  while kill -0 "$game_pid" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "the game did not exit within $1 s after Esc"
    sleep 0.2
  done
  local status=0
  wait "$game_pid" || status=$?
  game_pid=""
  ((status == 0)) || fail "the game exited with status $status"
}

state_of() { sed -E 's/.*: (score=[0-9]+ player=\([0-9]+,[0-9]+\)).*/\1/' <<<"$1"; }

# ---------------------------------------------------------------------------- run 1
echo "== run 1: new game, play, F5, Esc"
start_game "$work/run1.log"
wait_window 180
echo "window $window is up"
ready="$(wait_line '^game ready' 60)"
echo "$ready"
[[ "$ready" == *"new game"* ]] || fail "a fresh save file should start a new game: $ready"
sleep 1
keys Right Right Up
sleep 0.5
keys F5
saved_line="$(wait_line '^saved slot quick: ' 30)"
echo "$saved_line"
saved="$(state_of "$saved_line")"
# Walk away from the saved spot so that the autosave at exit differs from the quick slot.
keys Left Left Down Down
sleep 0.5
keys Escape
exit_line="$(wait_line '^autosaved .*: score=' 30)"
echo "$exit_line"
wait_exit 30
echo "run 1 exited cleanly"

# ---------------------------------------------------------------------------- run 2
echo "== run 2: resume the autosave, F9, check, screenshot, Esc"
start_game "$work/run2.log"
wait_window 120
echo "window $window is up"
ready="$(wait_line '^game ready' 60)"
echo "$ready"
[[ "$ready" == *"resumed autosave/"* ]] || fail "the second run should resume the autosave: $ready"
resumed="$(state_of "$ready")"
[[ "$resumed" == "$(state_of "$exit_line")" ]] ||
  fail "resumed state ($resumed) is not the state autosaved at exit ($(state_of "$exit_line"))"
[[ "$resumed" != "$saved" ]] ||
  fail "the resumed state equals the quick slot ($saved): the load could not be told apart"
sleep 1
keys F9
loaded_line="$(wait_line '^loaded slot quick: ' 30)"
echo "$loaded_line"
loaded="$(state_of "$loaded_line")"
[[ "$loaded" == "$saved" ]] || fail "loaded ($loaded) differs from saved ($saved)"
echo "loaded state matches the saved state: $loaded"

# Let the slot list and the sprites settle, then photograph the screen.
sleep 2
rm -f "$screenshot"
timeout 30 import -window root "$screenshot" || fail "import could not take a screenshot"
colors="$(identify -format '%k' "$screenshot")"
((colors > 50)) || fail "the screenshot has only $colors colors: the game did not render"
echo "screenshot: $screenshot ($(identify -format '%wx%h' "$screenshot"), $colors colors)"

keys Escape
wait_line '^quit' 30 >/dev/null
wait_exit 30
echo "run 2 exited cleanly"
echo "PASS: saved $saved, loaded $loaded"
