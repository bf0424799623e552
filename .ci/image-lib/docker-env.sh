# shellcheck shell=bash
# Sourced by .ci/image: a private Docker engine for CI and the base images the
# Dockerfile and deploy/compose.yaml name, made from Debian's packages.
#
# The engine's data root is a fixed directory outside the clone
# ($SLCI_DATA_ROOT, default /var/lib/sprintlink-ci-docker), so base images and
# build layers survive between runs on the same machine, also from a fresh clone.
# The engine is started without iptables and without the default bridge (this
# machine has neither); user-defined bridge networks and published ports
# (docker-proxy) still work.

SLCI_DATA_ROOT="${SLCI_DATA_ROOT:-/var/lib/sprintlink-ci-docker}"
SLCI_RUN="${SLCI_RUN:-/run/slci-docker}"
SLCI_SOCK="$SLCI_RUN/docker.sock"
SLCI_PIDFILE="$SLCI_RUN/dockerd.pid"
SLCI_LOG="$SLCI_DATA_ROOT.log"
SLCI_DEBIAN_MIRROR="${SLCI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SLCI_STARTED_DOCKERD=0

log() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'image: %s\n' "$*" >&2; exit 1; }

# Debian packages the image checks need, installed when missing.
ensure_host_packages() {
  local missing=() cmd pkg
  for pair in dockerd:docker.io debootstrap:debootstrap docker-compose:docker-compose \
    curl:curl flock:util-linux; do
    cmd="${pair%%:*}" pkg="${pair#*:}"
    command -v "$cmd" > /dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return
  log "installing ${missing[*]} (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
}

# Starts dockerd on $SLCI_SOCK unless one already answers there (then it is
# reused and left running). Sets DOCKER_HOST for everything that follows.
start_dockerd() {
  mkdir -p "$SLCI_DATA_ROOT" "$SLCI_RUN"
  export DOCKER_HOST="unix://$SLCI_SOCK"
  if docker version > /dev/null 2>&1; then
    log "dockerd already answers on $SLCI_SOCK: reusing it"
    return
  fi
  rm -f "$SLCI_PIDFILE" "$SLCI_SOCK"
  log "starting dockerd (data root $SLCI_DATA_ROOT, log $SLCI_LOG)"
  # setsid: the engine must not get the CI job's SIGINT; stop_dockerd ends it.
  setsid dockerd --iptables=false --ip6tables=false --bridge=none \
    --data-root "$SLCI_DATA_ROOT" --exec-root "$SLCI_RUN/exec" \
    -H "unix://$SLCI_SOCK" --pidfile "$SLCI_PIDFILE" >> "$SLCI_LOG" 2>&1 < /dev/null &
  SLCI_STARTED_DOCKERD=1
  local _
  for _ in $(seq 1 60); do
    docker version > /dev/null 2>&1 && return
    sleep 0.5
  done
  tail -n 30 "$SLCI_LOG" >&2
  die "dockerd did not answer within 30 s"
}

# Stops the dockerd this script started (by its pid file), waiting up to 30 s.
stop_dockerd() {
  ((SLCI_STARTED_DOCKERD == 1)) || return 0
  local pid
  pid="$(cat "$SLCI_PIDFILE" 2> /dev/null || true)"
  [[ -n "$pid" ]] || return 0
  log "stopping dockerd (pid $pid); the cache stays in $SLCI_DATA_ROOT"
  kill -TERM "$pid" 2> /dev/null || return 0
  local _
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2> /dev/null || return 0
    sleep 0.5
  done
  echo "dockerd $pid did not stop within 30 s" >&2
}

have_image() { docker image inspect "$1" > /dev/null 2>&1; }

# debootstrap a minbase bookworm root into $1 with the same apt sources as the
# official debian image (bookworm, bookworm-updates, bookworm-security).
debootstrap_root() {
  local root="$1" release="$2"
  log "debootstrap --variant=minbase $release ($SLCI_DEBIAN_MIRROR)"
  debootstrap --variant=minbase "$release" "$root" "$SLCI_DEBIAN_MIRROR" > "$root.debootstrap.log" 2>&1 \
    || { tail -n 20 "$root.debootstrap.log" >&2; die "debootstrap failed"; }
  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" << EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $release $release-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $release-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  debian_image_settings "$root"
}

# The settings the official debian:*-slim images carry (debuerreotype): apt
# keeps no package caches in layers, no translations, compressed indexes, and
# dpkg leaves out documentation, man pages and locales ("slim"). Without them a
# layer that runs apt-get is some 90 MB larger than on the official image.
debian_image_settings() {
  local root="$1"
  mkdir -p "$root/etc/apt/apt.conf.d" "$root/etc/dpkg/dpkg.cfg.d"
  cat > "$root/etc/apt/apt.conf.d/docker-clean" << 'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'force-unsafe-io' > "$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker" << 'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
}

# Cleans a root before it is imported: no apt lists or caches, no logs.
slim_root() {
  local root="$1"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/*
  find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2> /dev/null || true
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2> /dev/null || true
}

chroot_apt_install() {
  local root="$1"
  shift
  mount --bind /proc "$root/proc" 2> /dev/null || true
  local rc=0
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $*" > "$root.apt.log" 2>&1 || rc=$?
  umount "$root/proc" 2> /dev/null || true
  ((rc == 0)) || { tail -n 20 "$root.apt.log" >&2; die "apt-get install $* in $root failed"; }
}

# ensure_base_images RUST_VERSION DEBIAN_RELEASE POSTGRES_IMAGE
# Makes debian:R-slim, rust:V-slim-R and the PostgreSQL image when missing.
ensure_base_images() {
  local rust_version="$1" release="$2" pg_image="$3"
  local debian="debian:$release-slim" rust="rust:$rust_version-slim-$release"
  local work="$SLCI_DATA_ROOT-work"
  if have_image "$debian" && have_image "$rust" && have_image "$pg_image"; then
    log "base images cached: $debian, $rust, $pg_image"
    return
  fi
  rm -rf "$work"
  mkdir -p "$work"
  local t0=$SECONDS
  if ! have_image "$debian"; then
    debootstrap_root "$work/debian" "$release"
    slim_root "$work/debian"
    tar -C "$work/debian" --numeric-owner -c . | docker import \
      --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase $release $SLCI_DEBIAN_MIRROR" - "$debian" > /dev/null
    log "made $debian"
  fi
  if ! have_image "$rust"; then make_rust_image "$work" "$rust_version" "$release" "$rust"; fi
  if ! have_image "$pg_image"; then make_postgres_image "$pg_image" "$debian"; fi
  rm -rf "$work"
  log "base images made in $((SECONDS - t0)) s"
}

# The host toolchain whose rustc is RUST_VERSION (x.y or x.y.z).
find_toolchain() {
  local want="$1" tc v
  for tc in "$HOME"/.rustup/toolchains/*-x86_64-unknown-linux-gnu; do
    [[ -x "$tc/bin/rustc" && -x "$tc/bin/cargo" ]] || continue
    v="$("$tc/bin/rustc" --version | awk '{print $2}')"
    if [[ "$v" == "$want" || "$v" == "$want".* ]]; then
      echo "$tc"
      return
    fi
  done
  if command -v rustup > /dev/null 2>&1; then
    rustup toolchain install "$want" --profile minimal > /dev/null 2>&1 || true
    tc="$(rustup run "$want" rustc --print sysroot 2> /dev/null || true)"
    [[ -n "$tc" && -x "$tc/bin/cargo" ]] && { echo "$tc"; return; }
  fi
  return 1
}

# rust:V-slim-R: gcc, libc6-dev and ca-certificates on the bookworm root, the
# machine's own toolchain in /usr/local/rust and the machine's CA bundle (the
# registries are reached through a proxy that only this bundle trusts).
make_rust_image() {
  local work="$1" rust_version="$2" release="$3" tag="$4" tc root="$1/rust"
  tc="$(find_toolchain "$rust_version")" || die "no Rust $rust_version toolchain on this machine (rustup toolchain install $rust_version)"
  log "making $tag from $tc"
  if [[ -d "$work/debian" ]]; then
    cp -a "$work/debian" "$root"
  else
    debootstrap_root "$root" "$release"
  fi
  chroot_apt_install "$root" gcc libc6-dev ca-certificates
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo"
  # The compiler and cargo, without documentation and sources.
  tar -C "$tc" --exclude=./share/doc --exclude=./lib/rustlib/src --exclude=./share/man -c . \
    | tar -C "$root/usr/local/rust" -x
  slim_root "$root"
  tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change "ENV RUST_VERSION=$rust_version" \
    --change 'CMD ["bash"]' \
    --message "$release + gcc libc6-dev ca-certificates + $("$tc/bin/rustc" --version)" - "$tag" > /dev/null
  docker run --rm --network none "$tag" rustc --version > /dev/null || die "$tag: rustc does not run"
  log "made $tag ($(docker run --rm --network none "$tag" rustc --version))"
}

# The PostgreSQL image deploy/compose.yaml names, from Debian's packages
# (.ci/image-lib/postgres/Dockerfile).
make_postgres_image() {
  local tag="$1" debian="$2" major
  major="$(sed -E 's/^[^:]*:([0-9]+).*/\1/' <<< "$tag")"
  log "making $tag (Debian's postgresql-$major)"
  DOCKER_BUILDKIT=0 docker build --network host \
    --build-arg "BASE=$debian" --build-arg "PG_MAJOR=$major" \
    -t "$tag" "${SLCI_LIB:?}/postgres" > "$SLCI_DATA_ROOT-work/postgres-build.log" 2>&1 \
    || { tail -n 30 "$SLCI_DATA_ROOT-work/postgres-build.log" >&2; die "building $tag failed"; }
}
