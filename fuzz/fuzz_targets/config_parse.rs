//! Fuzz target: arbitrary text through the config parser. It must never panic; an error is
//! one line (it is printed as one line before exit status 78).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for name in ["p", "prod", "demo"] {
        if let Err(e) =
            iot_sub::config::parse(text, name, Some(Path::new("/etc/iot-sub/config.toml")))
        {
            let shown = e.to_string();
            assert!(!shown.contains(['\n', '\r']), "{shown:?}");
        }
    }
});
