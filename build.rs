//! Generates warren's man pages and shell completions from the clap definitions in `src/cli.rs`,
//! so that they always match the binary built beside them. The Debian package (`cargo deb`,
//! configured in Cargo.toml) ships them; nothing in the binary uses them.
//!
//! They are written to `assets/` in the profile's target directory (`target/release/assets/`
//! for `cargo build --release` and `cargo deb`, `target/debug/assets/` otherwise), the one
//! output place that stays put between builds: `OUT_DIR` has a hash in its name. cargo-deb
//! rewrites an asset path that starts with `target/release/` to that directory, wherever
//! `CARGO_TARGET_DIR` or `--target` put it. This script writes nothing else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::CommandFactory;
use clap_complete::Shell;

// The command line, compiled into this script as it is into the binary. `src/cli.rs` may use
// only clap, humantime and std, which are this script's build-dependencies.
#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");

    let assets = assets_dir()?;
    let man = assets.join("man");
    let completions = assets.join("completions");
    for dir in [&man, &completions] {
        fs::create_dir_all(dir)?;
    }

    // warren.1, and warren-run.1 and the like for each subcommand.
    let mut command = cli::Cli::command().disable_help_subcommand(true);
    command.build();
    man_pages(command, &man)?;
    // warren.bash, _warren (zsh) and warren.fish.
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli::Cli::command(), "warren", &completions)?;
    }
    Ok(())
}

/// Writes the man page of `command` and of each of its subcommands into `dir`. Unlike
/// `clap_mangen::generate_to`, every page's footer names warren and its version.
fn man_pages(command: clap::Command, dir: &Path) -> io::Result<()> {
    for subcommand in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(subcommand.clone(), dir)?;
    }
    clap_mangen::Man::new(command)
        .date(date())
        .source(format!("warren {}", env!("CARGO_PKG_VERSION")))
        .manual("warren manual")
        .generate_to(dir)?;
    Ok(())
}

/// The pages' date, YYYY-MM-DD: `SOURCE_DATE_EPOCH` when set, for reproducible builds, else
/// today. A page needs one: clap_mangen leaves an empty date out, and man then shows the
/// source where the date belongs.
fn date() -> String {
    let now = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|secs| secs.trim().parse().ok())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or_else(SystemTime::now);
    let mut date = humantime::format_rfc3339(now).to_string();
    date.truncate("YYYY-MM-DD".len());
    date
}

/// `<target dir>/<profile>/assets`: `OUT_DIR` is `<target dir>/<profile>/build/warren-<hash>/out`.
fn assets_dir() -> io::Result<PathBuf> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let build_dir = out_dir.ancestors().nth(2);
    match build_dir.and_then(|dir| Some((dir.file_name()?, dir.parent()?))) {
        Some((name, profile_dir)) if name == "build" => Ok(profile_dir.join("assets")),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "OUT_DIR {out_dir:?} is not <target dir>/<profile>/build/<package>/out; cannot \
                 tell where to put the man pages and completions"
            ),
        )),
    }
}
