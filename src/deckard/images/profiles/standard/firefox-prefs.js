// Deckard: Firefox ESR inside a desktop container (Debian reads every *.js file in /etc/firefox-esr).
// A desktop may not create user namespaces (its seccomp filter), so Firefox's sandbox runs without them
// (seccomp-bpf only); the container around the desktop is the wall that matters. Do not nag about it.
pref("security.sandbox.warn_unprivileged_namespaces", false);
// No first-run tabs: they point at mozilla.org, which a desktop may not be allowed to reach.
pref("datareporting.policy.firstRunURL", "");
pref("browser.aboutwelcome.enabled", false);
pref("browser.startup.homepage_override.mstone", "ignore");
