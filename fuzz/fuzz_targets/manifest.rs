//! The stage manifest parsers: `manifest.yaml` (StageDefinition::parse) and the embedded
//! config (StageConfig::from_bytes). Beyond "no panic": whatever parses holds only
//! normalised relative paths and confined links, and a parsed config round-trips.
#![no_main]

use std::path::Path;

use formats::manifest::{EntryKind, StageConfig, StageDefinition};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(def) = StageDefinition::parse(text, Path::new("fuzz/manifest.yaml"))
    {
        for f in &def.files {
            assert!(!f.path.as_str().split('/').any(|c| c == ".." || c.is_empty() || c == "."));
            assert!(f.target.as_str().starts_with('/'));
        }
        let _ = def.stage_dependencies();
        let _ = def.host_requirements();
    }
    if let Ok(config) = StageConfig::from_bytes(data) {
        for e in &config.entries {
            assert!(!e.path.as_str().starts_with('/'));
            assert!(!e.path.as_str().split('/').any(|c| c == ".." || c.is_empty() || c == "."));
            if e.kind == EntryKind::Symlink {
                let target = e.link.as_deref().expect("validated symlinks have link text");
                formats::path::confine_link(&e.path, target).expect("validated links are confined");
            }
        }
        let bytes = config.to_bytes();
        let again = StageConfig::from_bytes(&bytes).expect("a valid config re-parses");
        assert_eq!(again, config, "a config does not round-trip");
    }
});
