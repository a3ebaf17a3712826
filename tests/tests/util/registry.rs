//! Debian's `docker-registry` on 127.0.0.1 for the tests of the artifact store and of
//! channels: started per test on a free port, storage in a temp dir, killed on drop.
#![allow(dead_code)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ok, require_tool};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `docker-registry serve` on 127.0.0.1:<free port>, storage in a temp dir; killed on drop.
pub struct Registry {
    _dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl Registry {
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        let bin = require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = htpasswd {
            let htpasswd = require_tool("htpasswd", "apache2-utils");
            let entry = ok(Command::new(htpasswd).args(["-Bbn", user, pass]));
            let file = dir.path().join("htpasswd");
            fs::write(&file, entry.trim()).unwrap();
            config += &format!("auth:\n  htpasswd:\n    realm: op-dbus-test\n    path: {}\n", file.display());
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { _dir: dir, child, port };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "docker-registry did not listen on 127.0.0.1:{port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// The registry's storage directory (what it keeps of everything pushed).
    pub fn storage(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
