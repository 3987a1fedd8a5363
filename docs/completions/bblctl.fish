# fish completion for bblctl (made by bblctl.manual from bblctl --help)
complete -c bblctl -f
complete -c bblctl -n __fish_use_subcommand -l version -d "print BBL's version"
complete -c bblctl -n __fish_use_subcommand -a run -d 'run a command in a sandbox described by a bubblewrap command line, as '
complete -c bblctl -n '__fish_seen_subcommand_from run' -l help
complete -c bblctl -n '__fish_seen_subcommand_from run' -l name
complete -c bblctl -n '__fish_seen_subcommand_from run' -l single-instance
complete -c bblctl -n __fish_use_subcommand -a start -d 'start a sandbox from a profile'
complete -c bblctl -n '__fish_seen_subcommand_from start' -l detach
complete -c bblctl -n '__fish_seen_subcommand_from start' -l detach-key
complete -c bblctl -n '__fish_seen_subcommand_from start' -l help
complete -c bblctl -n '__fish_seen_subcommand_from start' -l name
complete -c bblctl -n __fish_use_subcommand -a profile -d 'the profiles'
complete -c bblctl -n '__fish_seen_subcommand_from profile' -l expanded
complete -c bblctl -n '__fish_seen_subcommand_from profile' -l help
complete -c bblctl -n __fish_use_subcommand -a ps -d 'list running instances and their memory use'
complete -c bblctl -n '__fish_seen_subcommand_from ps' -l all
complete -c bblctl -n '__fish_seen_subcommand_from ps' -l help
complete -c bblctl -n '__fish_seen_subcommand_from ps' -l json
complete -c bblctl -n '__fish_seen_subcommand_from ps' -l watch
complete -c bblctl -n __fish_use_subcommand -a tree -d 'the layer tree of each running instance, with its processes'
complete -c bblctl -n '__fish_seen_subcommand_from tree' -l help
complete -c bblctl -n '__fish_seen_subcommand_from tree' -l json
complete -c bblctl -n __fish_use_subcommand -a exec -d 'run a command in a layer of a running instance'
complete -c bblctl -n '__fish_seen_subcommand_from exec' -l help
complete -c bblctl -n '__fish_seen_subcommand_from exec' -l layer
complete -c bblctl -n __fish_use_subcommand -a attach -d 'show the app\'s own terminal, if it has one'
complete -c bblctl -n '__fish_seen_subcommand_from attach' -l detach-key
complete -c bblctl -n '__fish_seen_subcommand_from attach' -l help
complete -c bblctl -n '__fish_seen_subcommand_from attach' -l layer
complete -c bblctl -n '__fish_seen_subcommand_from attach' -l new
complete -c bblctl -n __fish_use_subcommand -a send-args -d 'hand arguments to a running instance'
complete -c bblctl -n '__fish_seen_subcommand_from send-args' -l help
complete -c bblctl -n __fish_use_subcommand -a stop -d 'SIGTERM to the main command'
complete -c bblctl -n '__fish_seen_subcommand_from stop' -l help
complete -c bblctl -n '__fish_seen_subcommand_from stop' -l timeout
complete -c bblctl -n __fish_use_subcommand -a kill -d 'send a signal to the main command'
complete -c bblctl -n '__fish_seen_subcommand_from kill' -l help
complete -c bblctl -n '__fish_seen_subcommand_from kill' -l signal
complete -c bblctl -n __fish_use_subcommand -a desktop -d 'a menu launcher that starts the profile'
complete -c bblctl -n '__fish_seen_subcommand_from desktop' -l from
complete -c bblctl -n '__fish_seen_subcommand_from desktop' -l help
complete -c bblctl -n __fish_use_subcommand -a daemon -d 'whether bbld runs'
complete -c bblctl -n '__fish_seen_subcommand_from daemon' -l help
complete -c bblctl -n '__fish_seen_subcommand_from daemon' -l json
complete -c bblctl -n __fish_use_subcommand -a setup -d 'make this install ready to use'
complete -c bblctl -n '__fish_seen_subcommand_from setup' -l help
complete -c bblctl -n '__fish_seen_subcommand_from setup' -l remove
complete -c bblctl -n __fish_use_subcommand -a doctor -d 'check what BBL needs on this machine, a line each, with the fix'
complete -c bblctl -n '__fish_seen_subcommand_from doctor' -l help
complete -c bblctl -n '__fish_seen_subcommand_from doctor' -l json
function __bblctl_profiles
    bblctl profile list 2>/dev/null | tail -n +2 | string split -f1 ' '
end
function __bblctl_instances
    bblctl ps --json 2>/dev/null | string match -rg '"(?:id|name)": "([^"]*)"'
end
complete -c bblctl -n '__fish_seen_subcommand_from start desktop profile' \
    -a '(__bblctl_profiles)' -F
complete -c bblctl -n '__fish_seen_subcommand_from tree exec attach send-args stop kill' \
    -a '(__bblctl_instances)'
