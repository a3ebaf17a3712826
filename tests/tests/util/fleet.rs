//! A fleet of SSH hosts on this machine, for tests of what crosses a network: each host is
//! a network namespace with its own address and a real `sshd` (Debian's openssh-server),
//! joined by veth pairs to a bridge in a namespace of its own; the client (the build
//! machine) is one more namespace on that bridge. No traffic leaves these namespaces. Each
//! host has its own installer root. Faults come from the kernel: a host's link taken down,
//! its rate limited (`tc` token bucket), its sshd killed. Everything is torn down on drop.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{is_root, ok, require_tool, run};

/// One host of a [`Fleet`].
pub struct FleetHost {
    /// The name the fleet's ssh config gives it (`h0`, `h1`, ...).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub addr: String,
    /// The installer's root on this host.
    pub root: PathBuf,
    /// The bridge side of its veth pair (in the bridge namespace).
    bridge_if: String,
    sshd: Option<Child>,
}

/// N hosts with sshd, a client namespace, and the ssh config that reaches them.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<FleetHost>,
    /// The client's namespace: run the build machine's commands in it ([`Fleet::client`]).
    pub client_ns: String,
    /// `ssh -F` this: names `h0`.. with their addresses, the client key, known host keys.
    pub ssh_config: PathBuf,
    bridge_ns: String,
    namespaces: Vec<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    ok(Command::new(require_tool("ip", "iproute2")).args(args));
}

impl Fleet {
    /// Starts `n` hosts (at most 200). Needs root, iproute2 and openssh-server.
    pub fn new(n: usize) -> Fleet {
        assert!(is_root(), "this test makes network namespaces: run it as root (CI does)");
        assert!((1..=200).contains(&n));
        let sshd = require_tool("sshd", "openssh-server");
        let keygen = require_tool("ssh-keygen", "openssh-client");
        require_tool("ssh", "openssh-client");
        // Names unique to this process and fleet; interface names stay under 16 bytes.
        let id = format!("{:x}{:x}", std::process::id() % 0x10000, NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new().prefix("op-dbus-fleet").tempdir().unwrap();
        // The hosts' roots hold what other users' processes (verify commands) read.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut fleet = Fleet {
            hosts: Vec::new(),
            client_ns: format!("opd{id}c"),
            ssh_config: dir.path().join("ssh_config"),
            bridge_ns: format!("opd{id}b"),
            namespaces: Vec::new(),
            dir,
        };
        let d = fleet.dir.path().to_owned();
        for key in ["host", "client"] {
            let _ = fs::remove_file(d.join(key));
            ok(Command::new(&keygen).args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"]).arg(d.join(key)));
        }
        fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        let host_pub = fs::read_to_string(d.join("host.pub")).unwrap();
        let host_pub = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        fs::write(d.join("known_hosts"), format!("10.77.0.* {host_pub}\n")).unwrap();
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();

        let (b, c) = (fleet.bridge_ns.clone(), fleet.client_ns.clone());
        for ns in [&b, &c] {
            ip(&["netns", "add", ns]);
            fleet.namespaces.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &b, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &b, "link", "set", "br0", "up"]);
        let cif = format!("o{id}c");
        ip(&["link", "add", "eth0", "netns", &c, "type", "veth", "peer", "name", &cif, "netns", &b]);
        ip(&["-n", &c, "addr", "add", "10.77.0.254/24", "dev", "eth0"]);
        ip(&["-n", &c, "link", "set", "eth0", "up"]);
        ip(&["-n", &b, "link", "set", &cif, "master", "br0", "up"]);

        let mut config = String::new();
        for i in 0..n {
            let ns = format!("opd{id}h{i}");
            let bridge_if = format!("o{id}h{i}");
            let addr = format!("10.77.0.{}", i + 1);
            ip(&["netns", "add", &ns]);
            fleet.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &bridge_if, "netns", &b]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &b, "link", "set", &bridge_if, "master", "br0", "up"]);
            let root = d.join(format!("h{i}-root"));
            fs::create_dir(&root).unwrap();
            let conf = d.join(format!("sshd_config.h{i}"));
            fs::write(
                &conf,
                format!(
                    "ListenAddress {addr}\nPort 22\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                     MaxStartups 100\nMaxSessions 100\nClientAliveInterval 5\nClientAliveCountMax 2\n",
                    host = d.join("host").display(),
                    auth = d.join("authorized_keys").display(),
                ),
            )
            .unwrap();
            let log = fs::File::create(d.join(format!("sshd.h{i}.log"))).unwrap();
            let child = Command::new(require_tool("ip", "iproute2"))
                .args(["netns", "exec", &ns])
                .arg(&sshd)
                .args(["-D", "-e", "-f"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            config.push_str(&format!("Host h{i}\n  HostName {addr}\n"));
            fleet.hosts.push(FleetHost { name: format!("h{i}"), ns, addr, root, bridge_if, sshd: Some(child) });
        }
        config.push_str(&format!(
            "Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 5\n  LogLevel ERROR\n",
            key = d.join("client").display(),
            known = d.join("known_hosts").display(),
        ));
        fs::write(&fleet.ssh_config, config).unwrap();
        fleet.wait_ready();
        fleet
    }

    /// Waits until every host answers over ssh (sshd takes a moment to listen).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for h in &self.hosts {
            loop {
                let out = run(self.client("ssh").arg("-F").arg(&self.ssh_config).arg(&h.name).arg("true"));
                if out.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sshd on {} ({}) does not answer: {}\nsshd log: {}",
                    h.name,
                    h.addr,
                    String::from_utf8_lossy(&out.stderr),
                    fs::read_to_string(self.dir.path().join(format!("sshd.{}.log", h.name))).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `program` run in the client's namespace (`ip netns exec`).
    pub fn client(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(require_tool("ip", "iproute2"));
        c.args(["netns", "exec", &self.client_ns]).arg(program);
        c
    }

    /// `ssh -F CONFIG HOST ARGS...` from the client's namespace.
    pub fn ssh(&self, host: usize, args: &[&str]) -> Command {
        let mut c = self.client("ssh");
        c.arg("-F").arg(&self.ssh_config).arg(&self.hosts[host].name).args(args);
        c
    }

    /// Takes host `i`'s link to the bridge down (`up: false`) or brings it back.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["-n", &self.bridge_ns, "link", "set", &self.hosts[i].bridge_if, if up { "up" } else { "down" }]);
    }

    /// The shell command that takes host `i`'s link down as [`Fleet::set_link`] does: for a
    /// script that runs on the host and cuts it off at a moment of its choosing.
    pub fn link_down_command(&self, i: usize) -> String {
        format!(
            "{} -n {} link set {} down",
            require_tool("ip", "iproute2").display(),
            self.bridge_ns,
            self.hosts[i].bridge_if
        )
    }

    /// Limits what reaches host `i` to `rate` (`tc` notation, `256kbit`; `None` lifts the
    /// limit): a token bucket on the bridge side of its link. (This machine's kernel has no
    /// `netem`; a token bucket and a link taken down are the faults it can make.)
    pub fn rate(&self, i: usize, rate: Option<&str>) {
        let tc = require_tool("tc", "iproute2");
        let mut c = Command::new(require_tool("ip", "iproute2"));
        c.args(["netns", "exec", &self.bridge_ns]).arg(tc);
        match rate {
            Some(r) => c
                .args(["qdisc", "replace", "dev", &self.hosts[i].bridge_if, "root", "tbf", "rate", r])
                .args(["burst", "16kb", "latency", "10s"]),
            None => c.args(["qdisc", "del", "dev", &self.hosts[i].bridge_if, "root"]),
        };
        ok(&mut c);
    }

    /// Stops host `i`'s sshd (connections to it then fail; what it runs goes on).
    pub fn kill_sshd(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The bytes received and sent on host `i`'s interface so far.
    pub fn bytes(&self, i: usize) -> (u64, u64) {
        let read = |what: &str| -> u64 {
            let out = ok(Command::new(require_tool("ip", "iproute2")).args([
                "netns",
                "exec",
                &self.hosts[i].ns,
                "cat",
                &format!("/sys/class/net/eth0/statistics/{what}_bytes"),
            ]));
            out.trim().parse().unwrap()
        };
        (read("rx"), read("tx"))
    }

    pub fn root(&self, i: usize) -> &Path {
        &self.hosts[i].root
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill_sshd(i);
        }
        for ns in &self.namespaces {
            // Whatever still runs inside (a session sshd forked) goes with it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
