//! `smallest-proxy service install|uninstall|status`: the per-user service files for a
//! developer's laptop, a launchd agent on macOS and a systemd user unit (with its socket) on
//! Linux, rendered from the templates in `contrib/` with this binary's path.
//!
//! Only service files are written: the config and the key stay where the user keeps them (a
//! `--config` path is named in the service; without one the service reads the key from the OS
//! keychain). Every file written carries [`MARKER`]; `uninstall` removes exactly the files
//! that carry it and nothing else (not the directories, which other services share), and
//! `install` refuses to overwrite a file of the same name that it did not write.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

/// The line every written file carries, and `uninstall` looks for.
pub const MARKER: &str = "written by `smallest-proxy service install`";
/// The launchd label, also the plist's file name.
pub const LAUNCHD_LABEL: &str = "ai.smallest.proxy";

const PLIST_TEMPLATE: &str = include_str!("../contrib/launchd/ai.smallest.proxy.plist");
const UNIT_TEMPLATE: &str = include_str!("../contrib/systemd-user/smallest-proxy.service");
const SOCKET_TEMPLATE: &str = include_str!("../contrib/systemd-user/smallest-proxy.socket");
/// What the templates name the binary and the home directory, replaced when rendering.
const PLIST_BINARY: &str = "<string>/usr/local/bin/smallest-proxy</string>";
const PLIST_HOME: &str = "__HOME__";
const UNIT_EXEC: &str = "ExecStart=%h/.cargo/bin/smallest-proxy run";
const UNIT_KEY_SOURCE: &str = "Environment=SMALLEST_PROXY_KEY_SOURCE=keyring\n";
const PLIST_KEY_SOURCE: &str = "  <key>EnvironmentVariables</key>
  <dict>
    <key>SMALLEST_PROXY_KEY_SOURCE</key>
    <string>keyring</string>
  </dict>
";

/// Which service manager the files are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// macOS: `~/Library/LaunchAgents/ai.smallest.proxy.plist`.
    Launchd,
    /// Linux: `~/.config/systemd/user/smallest-proxy.{service,socket}`.
    Systemd,
}

impl Manager {
    /// This OS's manager.
    pub fn native() -> Manager {
        if cfg!(target_os = "macos") {
            Manager::Launchd
        } else {
            Manager::Systemd
        }
    }
}

/// Where and what to install for.
#[derive(Debug, Clone)]
pub struct Target {
    pub manager: Manager,
    /// The user's home directory.
    pub home: PathBuf,
    /// `XDG_CONFIG_HOME` when set (systemd reads user units from there).
    pub xdg_config_home: Option<PathBuf>,
    /// The binary the service runs (absolute).
    pub binary: PathBuf,
    /// The config file the service passes with `--config` (absolute), if any. Without one the
    /// service sets `SMALLEST_PROXY_KEY_SOURCE=keyring`; with one the file decides.
    pub config: Option<PathBuf>,
}

impl Target {
    /// The files this target installs, with their contents.
    pub fn files(&self) -> Vec<(PathBuf, String)> {
        match self.manager {
            Manager::Launchd => {
                let dir = self.home.join("Library/LaunchAgents");
                vec![(dir.join(format!("{LAUNCHD_LABEL}.plist")), self.render_plist())]
            }
            Manager::Systemd => {
                let dir = self
                    .xdg_config_home
                    .clone()
                    .unwrap_or_else(|| self.home.join(".config"))
                    .join("systemd/user");
                vec![
                    (dir.join("smallest-proxy.service"), self.render_unit()),
                    (
                        dir.join("smallest-proxy.socket"),
                        format!("# {MARKER}\n{SOCKET_TEMPLATE}"),
                    ),
                ]
            }
        }
    }

    fn render_plist(&self) -> String {
        let mut arguments = format!("<string>{}</string>", xml_escape(&self.binary.display().to_string()));
        let mut text = PLIST_TEMPLATE.to_string();
        if let Some(config) = &self.config {
            let _ = write!(
                arguments,
                "\n    <string>--config</string>\n    <string>{}</string>",
                xml_escape(&config.display().to_string())
            );
            text = text.replace(PLIST_KEY_SOURCE, "");
        }
        let text = text
            .replace(PLIST_BINARY, &arguments)
            .replace(PLIST_HOME, &xml_escape(&self.home.display().to_string()));
        // The marker goes after the XML declaration, which must come first.
        text.replacen("<plist version", &format!("<!-- {MARKER} -->\n<plist version"), 1)
    }

    fn render_unit(&self) -> String {
        let mut exec = format!("ExecStart={} run", systemd_quote(&self.binary));
        let mut text = UNIT_TEMPLATE.to_string();
        if let Some(config) = &self.config {
            let _ = write!(exec, " --config {}", systemd_quote(config));
            text = text.replace(UNIT_KEY_SOURCE, "");
        }
        format!("# {MARKER}\n{}", text.replace(UNIT_EXEC, &exec))
    }

    /// How to start the service once the files are written.
    pub fn start_hint(&self) -> String {
        match self.manager {
            Manager::Launchd => format!("launchctl bootstrap gui/$(id -u) {}", shell_quote(&self.files()[0].0)),
            Manager::Systemd => {
                "systemctl --user daemon-reload && systemctl --user enable --now smallest-proxy.socket".into()
            }
        }
    }

    /// How to stop it before the files go.
    pub fn stop_hint(&self) -> String {
        match self.manager {
            Manager::Launchd => format!("launchctl bootout gui/$(id -u)/{LAUNCHD_LABEL}"),
            Manager::Systemd => "systemctl --user disable --now smallest-proxy.socket smallest-proxy.service".into(),
        }
    }

    /// Links that `systemctl --user enable` made to our units: while one exists, removing the
    /// files would leave it dangling.
    pub fn enabled_links(&self) -> Vec<PathBuf> {
        match self.manager {
            Manager::Launchd => Vec::new(),
            Manager::Systemd => {
                let files = self.files();
                let dir = files[0].0.parent().map(Path::to_path_buf).unwrap_or_default();
                [
                    "sockets.target.wants/smallest-proxy.socket",
                    "default.target.wants/smallest-proxy.service",
                ]
                .iter()
                .map(|link| dir.join(link))
                .filter(|link| link.symlink_metadata().is_ok())
                .collect()
            }
        }
    }
}

/// The state of one service file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Written by `install` (carries the marker).
    Installed,
    /// A file of that name that `install` did not write.
    Foreign,
    Absent,
}

pub fn file_state(path: &Path) -> FileState {
    match std::fs::read_to_string(path) {
        Ok(text) if text.contains(MARKER) => FileState::Installed,
        Ok(_) => FileState::Foreign,
        Err(e) if e.kind() == io::ErrorKind::NotFound => FileState::Absent,
        // Unreadable (or not text): not ours to touch.
        Err(_) => FileState::Foreign,
    }
}

/// Write the target's files (creating their directories). Refuses, writing nothing, when a
/// file of the same name exists that `install` did not write. Returns the paths written.
pub fn install(target: &Target) -> Result<Vec<PathBuf>, String> {
    let files = target.files();
    for (path, _) in &files {
        if file_state(path) == FileState::Foreign {
            return Err(format!(
                "{} exists and was not written by `smallest-proxy service install`; move it away first",
                path.display()
            ));
        }
    }
    let mut written = Vec::new();
    for (path, text) in files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Remove the files `install` wrote (those carrying the marker) and nothing else. Refuses
/// while the systemd units are still enabled. Returns the paths removed.
pub fn uninstall(target: &Target) -> Result<Vec<PathBuf>, String> {
    let links = target.enabled_links();
    if !links.is_empty() {
        return Err(format!(
            "the service is still enabled ({}); run `{}` first",
            links
                .iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            target.stop_hint()
        ));
    }
    let mut removed = Vec::new();
    for (path, _) in target.files() {
        if file_state(&path) == FileState::Installed {
            std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One ExecStart argument: quoted, with systemd's specifier (`%`) and variable (`$`)
/// expansion escaped, so any path is taken literally.
fn systemd_quote(path: &Path) -> String {
    let text = path
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{text}\"")
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(manager: Manager, config: Option<&str>) -> Target {
        Target {
            manager,
            home: "/home/dev".into(),
            xdg_config_home: None,
            binary: "/opt/my tools/smallest-proxy".into(),
            config: config.map(PathBuf::from),
        }
    }

    #[test]
    fn the_unit_runs_this_binary_and_reads_the_keychain_without_a_config() {
        let files = target(Manager::Systemd, None).files();
        assert_eq!(
            files[0].0,
            Path::new("/home/dev/.config/systemd/user/smallest-proxy.service")
        );
        assert_eq!(
            files[1].0,
            Path::new("/home/dev/.config/systemd/user/smallest-proxy.socket")
        );
        let unit = &files[0].1;
        assert!(
            unit.contains("\nExecStart=\"/opt/my tools/smallest-proxy\" run\n"),
            "{unit}"
        );
        assert!(unit.contains("\nEnvironment=SMALLEST_PROXY_KEY_SOURCE=keyring\n"));
        assert!(files.iter().all(|(_, text)| text.contains(MARKER)));
    }

    #[test]
    fn with_a_config_the_service_names_it_and_lets_it_choose_the_source() {
        let files = target(Manager::Systemd, Some("/home/dev/100%/p.toml")).files();
        let unit = &files[0].1;
        assert!(
            unit.contains("\nExecStart=\"/opt/my tools/smallest-proxy\" run --config \"/home/dev/100%%/p.toml\"\n"),
            "{unit}"
        );
        assert!(!unit.contains("SMALLEST_PROXY_KEY_SOURCE"));
        let plist = &target(Manager::Launchd, Some("/Users/dev/p&q.toml")).files()[0].1;
        assert!(plist.contains("<string>--config</string>\n    <string>/Users/dev/p&amp;q.toml</string>"));
        assert!(!plist.contains("SMALLEST_PROXY_KEY_SOURCE"));
    }

    #[test]
    fn xdg_config_home_moves_the_units() {
        let mut t = target(Manager::Systemd, None);
        t.xdg_config_home = Some("/cfg".into());
        assert_eq!(t.files()[0].0, Path::new("/cfg/systemd/user/smallest-proxy.service"));
    }

    #[test]
    fn the_plist_has_this_binary_and_the_home_directory() {
        let files = target(Manager::Launchd, None).files();
        assert_eq!(files.len(), 1);
        assert_eq!(
            files[0].0,
            Path::new("/home/dev/Library/LaunchAgents/ai.smallest.proxy.plist")
        );
        let plist = &files[0].1;
        assert!(plist.starts_with("<?xml"));
        assert!(plist.contains("<string>/opt/my tools/smallest-proxy</string>\n    <string>run</string>"));
        assert!(plist.contains("<string>/home/dev/Library/Logs/smallest-proxy.log</string>"));
        assert!(!plist.contains("__HOME__") && !plist.contains("/usr/local/bin"));
    }
}
