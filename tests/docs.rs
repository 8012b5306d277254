//! The documentation holds together, checked here rather than by memory: every relative link in
//! the repository's Markdown files leads to a file that exists and, when it names an `#anchor`,
//! to a heading of that file as GitHub makes anchors; docs/operations.md names every subcommand
//! and long flag of the command line that `--help` and the man pages are generated from; and the
//! README stays a short front door. None of it needs a broker.

// The command line, compiled in as build.rs does, to walk its subcommands and flags.
#[allow(dead_code)]
#[path = "../src/cli.rs"]
mod cli;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// The README's budget: the front door, with the reference in docs/.
const README_LIMIT: u64 = 12_500;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown file of the repository, relative to its root, skipping `target/` and hidden
/// directories such as `.git/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(root().join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = dir.join(&name);
            if entry.file_type().unwrap().is_dir() {
                if name != "target" && !name.starts_with('.') {
                    dirs.push(path);
                }
            } else if name.ends_with(".md") {
                files.push(path);
            }
        }
    }
    files.sort();
    for expected in ["README.md", "docs/operations.md"] {
        assert!(
            files.iter().any(|f| f == Path::new(expected)),
            "found the Markdown files, {expected} among them: {files:?}"
        );
    }
    files
}

/// The text with every fenced code block blanked out, lines kept, so that line numbers still
/// count from the top of the file.
fn without_fences(text: &str) -> String {
    let mut fence: Option<(char, usize)> = None;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |c| trimmed.chars().take_while(|&x| x == c).count());
        match (fence, marker) {
            (None, Some(c)) if run >= 3 => fence = Some((c, run)),
            (Some((c, n)), Some(m)) if m == c && run >= n && trimmed[run..].trim().is_empty() => {
                fence = None
            }
            (None, _) => out.push_str(line),
            _ => {}
        }
        out.push('\n');
    }
    out
}

/// The text with every inline code span blanked out (newlines kept), so that link-like text in
/// code is not taken for a link. A span closes on the next run of as many backticks before a
/// blank line; a run that never closes is literal, as in CommonMark.
fn without_code_spans(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let run_at = |at: usize| bytes[at..].iter().take_while(|&&b| b == b'`').count();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let run = run_at(i);
        let mut j = i + run;
        let mut close = None;
        while j < bytes.len() && !bytes[j..].starts_with(b"\n\n") {
            if bytes[j] == b'`' {
                let r = run_at(j);
                if r == run {
                    close = Some(j);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                // Whole characters only: the span starts and ends with an ASCII backtick.
                for b in &mut out[i..j + run] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = j + run;
            }
            None => i += run,
        }
    }
    String::from_utf8(out).expect("invariant: only whole characters were blanked")
}

/// The link targets of Markdown prose, each with its line number: inline links and images,
/// `[text](target "title")`, and reference definitions, `[label]: target`.
fn links(prose: &str) -> Vec<(usize, String)> {
    let line_of = |at: usize| prose[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = prose[from..].find("](") {
        let start = from + at + 2;
        let mut depth = 0;
        let mut end = None;
        for (k, c) in prose[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(start + k);
                    break;
                }
                ')' => depth -= 1,
                '\n' => break,
                _ => {}
            }
        }
        if let Some(end) = end {
            let target = prose[start..end].split_whitespace().next().unwrap_or("");
            let target = target.trim_start_matches('<').trim_end_matches('>');
            found.push((line_of(start), target.to_string()));
        }
        from = start;
    }
    for (n, line) in prose.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix('[') {
            if let Some((label, target)) = rest.split_once("]:") {
                if !label.is_empty() && !label.contains(']') {
                    let target = target.split_whitespace().next().unwrap_or("");
                    found.push((n + 1, target.to_string()));
                }
            }
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, every character dropped but letters, digits,
/// spaces, `-` and `_`, and each space made a `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text a heading shows: a link's target is not part of it.
fn shown(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    while let Some(at) = rest.find("](") {
        text.push_str(&rest[..at]);
        rest = match rest[at..].find(')') {
            Some(close) => &rest[at + close + 1..],
            None => "",
        };
    }
    text.push_str(rest);
    text
}

/// The anchors of a Markdown file's headings (`#` to `######`, outside code blocks); a heading
/// that repeats an earlier one gets `-1`, `-2`, ... as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    for line in without_fences(text).lines() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let hashes = line[indent..].chars().take_while(|&c| c == '#').count();
        let after = &line[indent + hashes..];
        if indent > 3 || !(1..=6).contains(&hashes) || !(after.is_empty() || after.starts_with(' '))
        {
            continue;
        }
        let mut title = after.trim();
        // An optional closing sequence of #s.
        let unclosed = title.trim_end_matches('#');
        if unclosed.is_empty() || unclosed.ends_with(' ') {
            title = unclosed.trim_end();
        }
        let base = slug(&shown(title));
        let mut anchor = base.clone();
        let mut n = 0;
        while anchors.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        anchors.insert(anchor);
    }
    anchors
}

/// Whether a link target is a URL (`https:`, `mailto:`, ...) rather than a path.
fn is_url(target: &str) -> bool {
    match target.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
        }
        None => false,
    }
}

/// What is wrong with the link `target` in the Markdown file `file`, if anything.
fn broken(file: &Path, target: &str) -> Option<String> {
    if target.is_empty() {
        return Some("empty link".into());
    }
    if is_url(target) {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let linked = if path.is_empty() {
        file.to_path_buf()
    } else if let Some(from_root) = path.strip_prefix('/') {
        PathBuf::from(from_root)
    } else {
        file.parent().unwrap_or(Path::new("")).join(path)
    };
    let full = root().join(&linked);
    if !full.exists() {
        return Some(format!("{} does not exist", linked.display()));
    }
    let anchor = anchor?;
    if full.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let known = anchors(&fs::read_to_string(&full).unwrap());
    if known.contains(anchor) {
        None
    } else {
        Some(format!(
            "{} has no heading with the anchor #{anchor}",
            linked.display()
        ))
    }
}

#[test]
fn github_anchors_drop_punctuation_and_number_repeated_headings() {
    let text = "# Operations\n\n## `warren dead-letters list`\n\n```sh\n# not a heading\n```\n\n\
                ## On a 3-node cluster (`tests/cluster.rs`)\n### 4. Start it\n\
                ## Retries\n## Retries\n## See [the guide](guide.md#x) ##\n";
    let found = anchors(text);
    let expected: BTreeSet<String> = [
        "operations",
        "warren-dead-letters-list",
        "on-a-3-node-cluster-testsclusterrs",
        "4-start-it",
        "retries",
        "retries-1",
        "see-the-guide",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, expected);
}

#[test]
fn links_in_code_are_not_links_and_titles_are_not_targets() {
    let text = "See [a](a.md#x \"title\") and `[b](b.md)`, ``c `[d](d.md)` e``,\n\
                ```\n[f](f.md)\n```\n![g](img/g.png)\n[h]: h.md\n";
    let found: Vec<String> = links(&without_code_spans(&without_fences(text)))
        .into_iter()
        .map(|(_, target)| target)
        .collect();
    assert_eq!(found, ["a.md#x", "img/g.png", "h.md"]);
}

#[test]
fn every_relative_link_in_the_markdown_files_leads_to_a_file_and_a_heading() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = fs::read_to_string(root().join(&file)).unwrap();
        for (line, target) in links(&without_code_spans(&without_fences(&text))) {
            checked += 1;
            if let Some(problem) = broken(&file, &target) {
                problems.push(format!("{}:{line}: ({target}): {problem}", file.display()));
            }
        }
    }
    assert!(checked >= 50, "found the links ({checked} of them)");
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// `warren SUBCOMMAND ...` for every subcommand, and `--flag` for every long flag, of `command`
/// and below it, leaving out what is hidden and clap's own help and version.
fn walk(
    command: &clap::Command,
    path: &str,
    names: &mut Vec<String>,
    flags: &mut BTreeSet<String>,
) {
    for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long().filter(|l| !matches!(*l, "help" | "version")) {
            flags.insert(format!("--{long}"));
        }
    }
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{path} {}", sub.get_name());
        walk(sub, &name, names, flags);
        names.push(name);
    }
}

/// Whether `text` has `word`, not as the start of a longer word or flag.
fn mentions(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(at, _)| {
        !text[at + word.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn every_subcommand_and_long_flag_of_the_command_line_is_in_the_operations_guide() {
    let mut command = cli::Cli::command();
    command.build();
    let (mut subcommands, mut flags) = (Vec::new(), BTreeSet::new());
    walk(&command, "warren", &mut subcommands, &mut flags);
    assert!(
        subcommands
            .iter()
            .any(|s| s == "warren dead-letters requeue")
            && flags.contains("--config")
            && flags.contains("--verbose"),
        "walked the command line: {subcommands:?} {flags:?}"
    );
    let guide = fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let missing: Vec<&String> = subcommands
        .iter()
        .chain(&flags)
        .filter(|name| !mentions(&guide, name))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name {missing:?}; document every subcommand and flag there"
    );
}

#[test]
fn every_flag_the_operations_guide_names_is_one_the_command_line_has() {
    let mut command = cli::Cli::command();
    command.build();
    let mut flags = BTreeSet::from(["--help".to_string(), "--version".to_string()]);
    let mut commands = vec![command];
    while let Some(command) = commands.pop() {
        // Hidden flags too: the guide may say what one is for.
        flags.extend(
            command
                .get_arguments()
                .filter_map(|a| a.get_long())
                .map(|l| format!("--{l}")),
        );
        commands.extend(command.get_subcommands().cloned());
    }
    assert!(flags.contains("--test-pause-after-confirm"), "{flags:?}");
    // Other programs' flags that the guide quotes.
    let others = ["--kill-whom"];
    let guide = fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let unknown: BTreeSet<String> = guide
        .match_indices("--")
        .filter(|(at, _)| !guide[..*at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-'))
        .map(|(at, _)| {
            let name: String = guide[at + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{name}")
        })
        // A flag starts with a letter: not a table's `---` or an em dash written `--`.
        .filter(|flag| flag[2..].starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter(|flag| !flags.contains(flag) && !others.contains(&flag.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/operations.md names {unknown:?}, which warren's command line does not have"
    );
}

#[test]
fn the_readme_is_a_front_door_of_at_most_12500_bytes() {
    let size = fs::metadata(root().join("README.md")).unwrap().len();
    assert!(
        size <= README_LIMIT,
        "README.md is {size} bytes, more than {README_LIMIT}: move reference into docs/ and link it"
    );
}

#[test]
fn the_architecture_stays_at_most_16000_bytes() {
    let size = fs::metadata(root().join("ARCHITECTURE.md")).unwrap().len();
    assert!(
        size <= 16_000,
        "ARCHITECTURE.md is {size} bytes: it names symbols and invariants, not every function"
    );
}
