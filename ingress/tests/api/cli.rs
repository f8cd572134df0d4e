//! The binary's start-up contract: one line and exit code 2 for bad configuration, and a
//! `--check-config` that shows the effective values without secrets.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_smsflow-ingress");

fn ingress() -> Command {
    let mut command = Command::new(BIN);
    // Start from a clean slate: no SMSFLOW_* variables from the developer's shell.
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("SMSFLOW_")) {
        command.env_remove(name);
    }
    command
}

#[test]
fn a_missing_secret_prints_one_line_naming_the_key_and_exits_2() {
    let output = ingress().output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("plivo.auth_token") && stderr.contains("SMSFLOW_PLIVO__AUTH_TOKEN"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn an_invalid_value_prints_one_line_naming_the_key_and_exits_2() {
    let output =
        ingress().env("SMSFLOW_PLIVO__AUTH_TOKEN", "x").env("SMSFLOW_AMQP__PREFETCH", "lots").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("amqp.prefetch"), "{stderr}");
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let output = ingress()
        .args(["--check-config"])
        .env("SMSFLOW_PLIVO__AUTH_TOKEN", "very-secret-token-value")
        .env("SMSFLOW_AMQP__URL", "amqp://user:broker-password@mq:5672/%2f")
        .env("SMSFLOW_AMQP__PREFETCH", "321")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("prefetch = 321"), "{stdout}");
    assert!(stdout.contains("[REDACTED]"), "{stdout}");
    assert!(!stdout.contains("very-secret-token-value") && !stdout.contains("broker-password"), "{stdout}");
}

#[test]
fn version_and_help_answer() {
    let version = ingress().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8(version.stdout).unwrap().starts_with("smsflow-ingress "));
    let help = ingress().arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8(help.stdout).unwrap().contains("--check-config"));
}
