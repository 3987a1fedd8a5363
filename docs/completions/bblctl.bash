# bash completion for bblctl (made by bblctl.manual from bblctl --help)
_bblctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} command=${COMP_WORDS[1]} opts words
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "run start profile ps tree exec attach send-args stop kill desktop daemon setup doctor --help --version" -- "$cur"))
        return
    fi
    case $command in
        run) opts="--help --name --single-instance" ;;
        start) opts="--detach --detach-key --help --name" ;;
        profile) opts="--expanded --help" ;;
        ps) opts="--all --help --json --watch" ;;
        tree) opts="--help --json" ;;
        exec) opts="--help --layer" ;;
        attach) opts="--detach-key --help --layer --new" ;;
        send-args) opts="--help" ;;
        stop) opts="--help --timeout" ;;
        kill) opts="--help --signal" ;;
        desktop) opts="--from --help" ;;
        daemon) opts="--help --json" ;;
        setup) opts="--help --remove" ;;
        doctor) opts="--help --json" ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case " exec attach send-args stop kill " in *" $command "*)
        words=$(bblctl ps --json 2>/dev/null |
            sed -n 's/.*"\(id\|name\)": "\([^"]*\)".*/\2/p')
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
        return ;;
    esac
    case " start desktop profile " in *" $command "*)
        words="$(bblctl profile list 2>/dev/null | awk 'NR > 1 {print $1}')"
        words="$words list show validate install"
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
        return ;;
    esac
    COMPREPLY=($(compgen -f -- "$cur"))
}
complete -F _bblctl bblctl
