package main

// shell.go: the small /bin/sh that guest programs run in, against the VM's in-memory file system.
// Supported: `;`, `&&`, `||`, `|`, newlines, '#' comments, '...' and "..." quoting, backslash
// escapes, $VAR ${VAR} $? $# $@ $1..$9 expansion (no word splitting, no globbing), NAME=value,
// redirections `> F`, `>> F`, `< F`, `2> F`, `2>> F`, `2>&1`, `>&2`, and the built-ins below.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
)

// wpart is a piece of a word: literal text, or a variable to expand at run time.
type wpart struct {
	lit    string
	varRef string
}

// token is a word (parts) or an operator (op), with the fd a redirection applies to.
type token struct {
	op    string
	fd    int
	parts []wpart
}

// redir is one redirection of a command.
type redir struct {
	fd     int
	op     string // ">", ">>", "<", ">&"
	target []wpart
}

// command is a simple command: words and redirections.
type command struct {
	words  [][]wpart
	redirs []redir
}

// andOr is a pipeline with the connector (";", "&&", "||") that leads to it.
type andOr struct {
	conn     string
	pipeline []*command
}

// sink collects a command's output; a file sink is appended to its file when the command ends.
type sink struct {
	buf     bytes.Buffer
	file    string
	discard bool
}

// write adds output unless the sink discards it.
func (s *sink) write(b []byte) {
	if !s.discard {
		s.buf.Write(b)
	}
}

// printf writes formatted output to the sink.
func (s *sink) printf(format string, a ...interface{}) { s.write([]byte(fmt.Sprintf(format, a...))) }

// shell is one interpreter instance: a process, or a nested `sh`.
type shell struct {
	g      *guestVM
	p      *process
	env    map[string]string
	order  []string
	args   []string // $0 $1 ...
	cwd    string
	status int
	exited bool
}

// builtin is a command implemented in the simulator.
type builtin func(sh *shell, args []string, in []byte, out, errw *sink) int

var builtins map[string]builtin

// init fills the built-in table (done here to allow the recursive sh).
func init() {
	builtins = map[string]builtin{
		"echo": biEcho, "printf": biPrintf, "cat": biCat, "true": biStatus(0), ":": biStatus(0),
		"false": biStatus(1), "exit": biExit, "env": biEnv, "export": biExport, "pwd": biPwd,
		"cd": biCd, "sleep": biSleep, "sha256sum": biSha256sum, "stat": biStat, "mkdir": biMkdir,
		"rm": biRm, "ls": biLs, "uname": biUname, "hostname": biHostname, "whoami": biWhoami,
		"test": biTest, "[": biTest, "touch": biTouch, "chmod": biChmod, "mv": biMv, "cp": biCp,
		"sh": biSh, "bash": biSh,
	}
}

// lex splits a script into tokens; quoting decides what stays literal.
func lex(src string) ([]token, error) {
	var toks []token
	var cur []wpart
	inWord := false
	lit := func(s string) { // appends literal text, merged into a preceding literal part
		if n := len(cur); n > 0 && cur[n-1].varRef == "" {
			cur[n-1].lit += s
		} else {
			cur = append(cur, wpart{lit: s})
		}
		inWord = true
	}
	flush := func() {
		if inWord {
			toks = append(toks, token{parts: cur})
		}
		cur, inWord = nil, false
	}
	dollar := func(i int) int { // appends the $-reference whose '$' is at src[i-1]; returns its end
		name, end := varAt(src, i)
		if name == "" {
			lit("$")
			return i
		}
		cur = append(cur, wpart{varRef: name})
		inWord = true
		return end
	}
	for i := 0; i < len(src); {
		c := src[i]
		switch {
		case c == ' ' || c == '\t':
			flush()
			i++
		case c == '#' && !inWord:
			for i < len(src) && src[i] != '\n' {
				i++
			}
		case c == '\n' || c == ';' || c == '&' || c == '|':
			flush()
			if i+1 < len(src) && (src[i:i+2] == "&&" || src[i:i+2] == "||") {
				toks = append(toks, token{op: src[i : i+2]})
				i += 2
			} else {
				op := "|"
				if c != '|' {
					op = ";" // a newline ends a command; background jobs (&) run in the foreground
				}
				toks = append(toks, token{op: op})
				i++
			}
		case c == '>' || c == '<' || ((c == '1' || c == '2') && !inWord && i+1 < len(src) && (src[i+1] == '>' || src[i+1] == '<')):
			flush()
			fd := 1
			if c == '<' {
				fd = 0
			}
			if c == '1' || c == '2' {
				fd = int(c - '0')
				i++
			}
			op := src[i : i+1]
			i++
			if op == ">" && i < len(src) && src[i] == '>' {
				op, i = ">>", i+1
			} else if op == ">" && i+1 < len(src) && src[i] == '&' && (src[i+1] == '1' || src[i+1] == '2') {
				toks = append(toks, token{op: ">&", fd: fd, parts: []wpart{{lit: src[i+1 : i+2]}}})
				i += 2
				continue
			}
			toks = append(toks, token{op: op, fd: fd})
		case c == '\'':
			j := strings.IndexByte(src[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated quoted string")
			}
			lit(src[i+1 : i+1+j])
			i += j + 2
		case c == '"':
			i++
			inWord = true
			for ; ; i++ {
				if i >= len(src) {
					return nil, fmt.Errorf("unterminated quoted string")
				}
				if src[i] == '"' {
					i++
					break
				}
				if src[i] == '\\' && i+1 < len(src) && strings.IndexByte("$`\"\\\n", src[i+1]) >= 0 {
					lit(src[i+1 : i+2])
					i++
				} else if src[i] == '$' {
					i = dollar(i+1) - 1
				} else {
					lit(src[i : i+1])
				}
			}
		case c == '\\' && i+1 < len(src):
			if src[i+1] != '\n' {
				lit(src[i+1 : i+2])
			}
			i += 2
		case c == '$':
			i = dollar(i + 1)
		default:
			lit(src[i : i+1])
			i++
		}
	}
	flush()
	return toks, nil
}

// varAt reads the name of a $-reference starting at src[i] ("" if none) and returns its end.
func varAt(src string, i int) (string, int) {
	if i < len(src) && src[i] == '{' {
		if j := strings.IndexByte(src[i:], '}'); j > 0 {
			return src[i+1 : i+j], i + j + 1
		}
	}
	if i < len(src) && strings.IndexByte("?#@0123456789", src[i]) >= 0 {
		return src[i : i+1], i + 1
	}
	j := i
	for j < len(src) && (src[j] == '_' || isAlnum(src[j])) {
		j++
	}
	return src[i:j], j
}

// isAlnum reports an ASCII letter or digit.
func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// parse groups tokens into and-or lists of pipelines of commands.
func parse(toks []token) ([]andOr, error) {
	list := []andOr{{conn: ";"}}
	cur := &command{}
	endCmd := func() error {
		if len(cur.words) == 0 && len(cur.redirs) == 0 {
			return fmt.Errorf("syntax error: unexpected operator")
		}
		last := &list[len(list)-1]
		last.pipeline = append(last.pipeline, cur)
		cur = &command{}
		return nil
	}
	for i := 0; i < len(toks); i++ {
		t := toks[i]
		switch t.op {
		case "":
			cur.words = append(cur.words, t.parts)
		case ">&":
			cur.redirs = append(cur.redirs, redir{fd: t.fd, op: t.op, target: t.parts})
		case ">", ">>", "<":
			if i+1 >= len(toks) || toks[i+1].op != "" {
				return nil, fmt.Errorf("syntax error: redirection without a file")
			}
			i++
			cur.redirs = append(cur.redirs, redir{fd: t.fd, op: t.op, target: toks[i].parts})
		case "|":
			if err := endCmd(); err != nil {
				return nil, err
			}
		default: // ; && ||
			if len(cur.words) == 0 && len(cur.redirs) == 0 && t.op == ";" && len(list[len(list)-1].pipeline) == 0 {
				continue // empty line
			}
			if err := endCmd(); err != nil {
				return nil, err
			}
			list = append(list, andOr{conn: t.op})
		}
	}
	if len(cur.words) > 0 || len(cur.redirs) > 0 {
		_ = endCmd()
	} else if n := len(list); n > 1 && len(list[n-1].pipeline) == 0 && list[n-1].conn != ";" {
		return nil, fmt.Errorf("syntax error: unexpected end of file")
	}
	return list, nil
}

// newShell makes an interpreter for process p with the given environment and working directory.
func newShell(g *guestVM, p *process, env []string, cwd string, args []string) *shell {
	sh := &shell{g: g, p: p, env: map[string]string{}, cwd: cwd, args: args}
	for _, kv := range env {
		if i := strings.IndexByte(kv, '='); i > 0 {
			sh.setVar(kv[:i], kv[i+1:])
		}
	}
	return sh
}

// setVar sets a variable, keeping first-definition order for `env`.
func (sh *shell) setVar(k, v string) {
	if _, ok := sh.env[k]; !ok {
		sh.order = append(sh.order, k)
	}
	sh.env[k] = v
}

// expand turns a word into its string.
func (sh *shell) expand(w []wpart) string {
	var b strings.Builder
	for _, p := range w {
		switch {
		case p.varRef == "":
			b.WriteString(p.lit)
		case p.varRef == "?":
			b.WriteString(strconv.Itoa(sh.status))
		case p.varRef == "#":
			b.WriteString(strconv.Itoa(max(len(sh.args)-1, 0)))
		case p.varRef == "@":
			if len(sh.args) > 1 {
				b.WriteString(strings.Join(sh.args[1:], " "))
			}
		case p.varRef[0] >= '0' && p.varRef[0] <= '9':
			if n, _ := strconv.Atoi(p.varRef); n < len(sh.args) {
				b.WriteString(sh.args[n])
			}
		default:
			b.WriteString(sh.env[p.varRef])
		}
	}
	return b.String()
}

// max returns the larger int (Go 1.19 has no builtin).
func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

// abs resolves a path against the working directory.
func (sh *shell) abs(p string) string {
	if strings.HasPrefix(p, "/") {
		return path.Clean(p)
	}
	return path.Join(sh.cwd, p)
}

// killed reports whether the process was terminated.
func (sh *shell) killed() bool { return sh.p != nil && sh.p.info.EndTime != nil }

// run parses and runs a script; output not redirected goes to out and errw.
func (sh *shell) run(src string, in []byte, out, errw *sink) int {
	toks, err := lex(src)
	var list []andOr
	if err == nil {
		list, err = parse(toks)
	}
	if err != nil {
		errw.printf("sh: %s\n", err)
		sh.status = 2
		return 2
	}
	for _, item := range list {
		if sh.exited || sh.killed() {
			break
		}
		if len(item.pipeline) == 0 || (item.conn == "&&" && sh.status != 0) || (item.conn == "||" && sh.status == 0) {
			continue
		}
		data := in
		for i, c := range item.pipeline {
			o := out
			if i < len(item.pipeline)-1 {
				o = &sink{}
			}
			sh.status = sh.runCommand(c, data, o, errw)
			data = o.buf.Bytes()
		}
	}
	return sh.status
}

// runCommand applies a command's redirections, runs it, and writes redirected output to files.
func (sh *shell) runCommand(c *command, in []byte, out, errw *sink) int {
	fds := map[int]*sink{1: out, 2: errw}
	var files []*sink
	for _, r := range c.redirs {
		target := sh.expand(r.target)
		switch r.op {
		case ">&":
			fds[r.fd] = fds[int(target[0]-'0')]
		case "<":
			data, err := sh.g.fs.readFile(sh.abs(target))
			if err != nil {
				fds[2].printf("sh: can't open '%s': %s\n", target, err)
				return 1
			}
			in = data
		default:
			p := sh.abs(target)
			if err := sh.g.fs.writeFile(p, nil, 0644, true, r.op == ">>"); err != nil {
				fds[2].printf("sh: can't create %s: %s\n", target, err)
				return 1
			}
			fds[r.fd] = &sink{file: p}
			files = append(files, fds[r.fd])
		}
	}
	defer func() {
		for _, f := range files {
			_ = sh.g.fs.writeFile(f.file, f.buf.Bytes(), 0644, true, true)
		}
	}()
	var args []string
	assigning := true
	for _, w := range c.words {
		if assigning && len(w) > 0 && w[0].varRef == "" {
			if i := strings.IndexByte(w[0].lit, '='); i > 0 && validName(w[0].lit[:i]) {
				v := sh.expand(append([]wpart{{lit: w[0].lit[i+1:]}}, w[1:]...))
				sh.setVar(w[0].lit[:i], v)
				continue
			}
		}
		assigning = false
		args = append(args, sh.expand(w))
	}
	if len(args) == 0 {
		return 0
	}
	return sh.exec(args, in, fds[1], fds[2])
}

// validName reports a shell variable name.
func validName(s string) bool {
	for i := 0; i < len(s); i++ {
		if !(s[i] == '_' || isAlnum(s[i])) || (i == 0 && s[i] >= '0' && s[i] <= '9') {
			return false
		}
	}
	return s != ""
}

// exec runs a built-in by base name, or a script file named by path; else exit 127.
func (sh *shell) exec(args []string, in []byte, out, errw *sink) int {
	if f, ok := builtins[path.Base(args[0])]; ok {
		return f(sh, args, in, out, errw)
	}
	if strings.Contains(args[0], "/") {
		if _, err := sh.g.fs.readFile(sh.abs(args[0])); err == nil {
			return biSh(sh, append([]string{"sh"}, args...), in, out, errw)
		}
	}
	errw.printf("sh: %s: not found\n", args[0])
	return 127
}

// biStatus makes a built-in that only returns a status (true, false, :).
func biStatus(code int) builtin {
	return func(*shell, []string, []byte, *sink, *sink) int { return code }
}

// biEcho prints its arguments (-n: no newline, -e: backslash escapes).
func biEcho(sh *shell, args []string, in []byte, out, errw *sink) int {
	nl, esc := true, false
	for len(args) > 1 && (args[1] == "-n" || args[1] == "-e" || args[1] == "-E") {
		nl, esc = nl && args[1] != "-n", esc || args[1] == "-e"
		args = args[1:]
	}
	s := strings.Join(args[1:], " ")
	if esc {
		s = unescape(s)
	}
	if nl {
		s += "\n"
	}
	out.write([]byte(s))
	return 0
}

// unescape interprets \n \t \\ and \" sequences.
func unescape(s string) string {
	return strings.NewReplacer(`\n`, "\n", `\t`, "\t", `\\`, `\`, `\"`, `"`, `\r`, "\r").Replace(s)
}

// biPrintf formats with %s %d %% and escapes, reusing the format for leftover arguments.
func biPrintf(sh *shell, args []string, in []byte, out, errw *sink) int {
	if len(args) < 2 {
		errw.printf("printf: usage: printf FORMAT [ARGUMENT]...\n")
		return 2
	}
	format, rest := unescape(args[1]), args[2:]
	for {
		var b strings.Builder
		used := 0
		for i := 0; i < len(format); i++ {
			if format[i] != '%' || i+1 >= len(format) {
				b.WriteByte(format[i])
				continue
			}
			i++
			if format[i] == '%' {
				b.WriteByte('%')
				continue
			}
			arg := ""
			if used < len(rest) {
				arg = rest[used]
			}
			used++
			if format[i] == 'd' && arg == "" {
				arg = "0"
			}
			b.WriteString(arg)
		}
		out.write([]byte(b.String()))
		if used == 0 || used >= len(rest) {
			return 0
		}
		rest = rest[used:]
	}
}

// biCat copies files (or stdin for none or "-") to stdout.
func biCat(sh *shell, args []string, in []byte, out, errw *sink) int {
	if len(args) == 1 {
		args = append(args, "-")
	}
	code := 0
	for _, f := range args[1:] {
		if f == "-" {
			out.write(in)
			continue
		}
		data, err := sh.g.fs.readFile(sh.abs(f))
		if err != nil {
			errw.printf("cat: can't open '%s': %s\n", f, err)
			code = 1
			continue
		}
		out.write(data)
	}
	return code
}

// biExit ends the script with the given status (default: the last one).
func biExit(sh *shell, args []string, in []byte, out, errw *sink) int {
	code := sh.status
	if len(args) > 1 {
		n, err := strconv.Atoi(args[1])
		if err != nil {
			errw.printf("sh: exit: Illegal number: %s\n", args[1])
			n = 2
		}
		code = n & 0xff
	}
	sh.exited = true
	return code
}

// biEnv prints the environment.
func biEnv(sh *shell, args []string, in []byte, out, errw *sink) int {
	for _, k := range sh.order {
		out.printf("%s=%s\n", k, sh.env[k])
	}
	return 0
}

// biExport sets variables given as NAME=value.
func biExport(sh *shell, args []string, in []byte, out, errw *sink) int {
	for _, a := range args[1:] {
		if i := strings.IndexByte(a, '='); i > 0 {
			sh.setVar(a[:i], a[i+1:])
		}
	}
	return 0
}

// biPwd prints the working directory.
func biPwd(sh *shell, args []string, in []byte, out, errw *sink) int {
	out.printf("%s\n", sh.cwd)
	return 0
}

// biCd changes the working directory (default HOME).
func biCd(sh *shell, args []string, in []byte, out, errw *sink) int {
	dir := sh.env["HOME"]
	if len(args) > 1 {
		dir = args[1]
	}
	n, err := sh.g.fs.lookup(sh.abs(dir))
	if err == nil && !n.dir {
		err = &fsError{"notDir", dir}
	}
	if err != nil {
		errw.printf("sh: cd: can't cd to %s: %s\n", dir, err)
		return 2
	}
	sh.cwd = sh.abs(dir)
	sh.setVar("PWD", sh.cwd)
	return 0
}

// biSleep keeps the process running for N seconds of wall time without holding the lock.
func biSleep(sh *shell, args []string, in []byte, out, errw *sink) int {
	if len(args) < 2 {
		errw.printf("sleep: missing operand\n")
		return 1
	}
	secs, err := strconv.ParseFloat(strings.TrimSuffix(args[1], "s"), 64)
	if err != nil || secs < 0 {
		errw.printf("sleep: invalid number '%s'\n", args[1])
		return 1
	}
	if sh.p == nil || !sh.p.sleep(time.Duration(secs*float64(time.Second))) {
		return 143
	}
	return 0
}

// biSha256sum prints "HASH  NAME" per file (stdin for none).
func biSha256sum(sh *shell, args []string, in []byte, out, errw *sink) int {
	if len(args) == 1 {
		args = append(args, "-")
	}
	code := 0
	for _, f := range args[1:] {
		data := in
		if f != "-" {
			var err error
			if data, err = sh.g.fs.readFile(sh.abs(f)); err != nil {
				errw.printf("sha256sum: %s: %s\n", f, err)
				code = 1
				continue
			}
		}
		sum := sha256.Sum256(data)
		out.printf("%s  %s\n", hex.EncodeToString(sum[:]), f)
	}
	return code
}

// biStat prints -c FORMAT per file: %s size, %a octal mode, %n name, %Y mtime, %F type, %u %g ids.
func biStat(sh *shell, args []string, in []byte, out, errw *sink) int {
	format := "%n %s %a %Y\n"
	if len(args) > 2 && args[1] == "-c" {
		format, args = args[2]+"\n", args[2:]
	}
	code := 0
	for _, f := range args[1:] {
		n, err := sh.g.fs.lookup(sh.abs(f))
		if err != nil {
			errw.printf("stat: can't stat '%s': %s\n", f, err)
			code = 1
			continue
		}
		kind, size := "regular file", len(n.data)
		if n.dir {
			kind, size = "directory", 4096
		}
		out.write([]byte(strings.NewReplacer("%s", strconv.Itoa(size), "%a", strconv.FormatUint(uint64(n.mode), 8),
			"%n", f, "%Y", strconv.FormatInt(n.mtime.Unix(), 10), "%F", kind,
			"%u", strconv.Itoa(int(n.uid)), "%g", strconv.Itoa(int(n.gid))).Replace(format)))
	}
	return code
}

// flags splits leading "-xyz" options from operands.
func flags(args []string) (string, []string) {
	var opts string
	i := 1
	for ; i < len(args) && len(args[i]) > 1 && args[i][0] == '-'; i++ {
		if args[i] == "--" {
			i++
			break
		}
		opts += args[i][1:]
	}
	return opts, args[i:]
}

// biMkdir creates directories (-p: parents, no error if present).
func biMkdir(sh *shell, args []string, in []byte, out, errw *sink) int {
	opts, dirs := flags(args)
	code := 0
	for _, d := range dirs {
		if err := sh.g.fs.mkdir(sh.abs(d), strings.Contains(opts, "p"), 0755); err != nil {
			errw.printf("mkdir: can't create directory '%s': %s\n", d, err)
			code = 1
		}
	}
	return code
}

// biRm removes files (-r: directories too, -f: no error for missing ones).
func biRm(sh *shell, args []string, in []byte, out, errw *sink) int {
	opts, files := flags(args)
	recursive, force := strings.ContainsAny(opts, "rR"), strings.Contains(opts, "f")
	code := 0
	for _, f := range files {
		n, err := sh.g.fs.lookup(sh.abs(f))
		if err == nil {
			if n.dir && !recursive {
				err = &fsError{"notFile", f}
			} else {
				err = sh.g.fs.remove(sh.abs(f), n.dir, true)
			}
		}
		if err != nil && !(force && err.(*fsError).kind == "notFound") {
			errw.printf("rm: can't remove '%s': %s\n", f, err)
			code = 1
		}
	}
	return code
}

// biLs lists directory entries one per line (-a: dot files, -l: mode, size, name).
func biLs(sh *shell, args []string, in []byte, out, errw *sink) int {
	opts, paths := flags(args)
	if len(paths) == 0 {
		paths = []string{"."}
	}
	code := 0
	for _, p := range paths {
		n, err := sh.g.fs.lookup(sh.abs(p))
		if err != nil {
			errw.printf("ls: %s: %s\n", p, err)
			code = 1
			continue
		}
		entries := map[string]*node{p: n}
		if n.dir {
			entries = n.children
		}
		var names []string
		for name := range entries {
			if strings.HasPrefix(name, ".") && !strings.Contains(opts, "a") && n.dir {
				continue
			}
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if strings.Contains(opts, "l") {
				e := entries[name]
				mode := os.FileMode(e.mode & 0777)
				if e.dir {
					mode |= os.ModeDir
				}
				out.printf("%s %d %d %8d %s %s\n", mode, e.uid, e.gid, len(e.data), e.mtime.Format("Jan _2 15:04"), name)
			} else {
				out.printf("%s\n", name)
			}
		}
	}
	return code
}

// biUname prints kernel facts (-a: all, -s -n -r -m).
func biUname(sh *shell, args []string, in []byte, out, errw *sink) int {
	host := sh.hostname()
	fields := map[string]string{"s": "Linux", "n": host, "r": "6.1.0-gve-sim", "m": "x86_64"}
	opts, _ := flags(args)
	if strings.Contains(opts, "a") {
		out.printf("Linux %s 6.1.0-gve-sim #1 SMP x86_64 GNU/Linux\n", host)
		return 0
	}
	var parts []string
	for _, f := range "snrm" {
		if strings.ContainsRune(opts, f) {
			parts = append(parts, fields[string(f)])
		}
	}
	if len(parts) == 0 {
		parts = []string{"Linux"}
	}
	out.printf("%s\n", strings.Join(parts, " "))
	return 0
}

// hostname reads /etc/hostname.
func (sh *shell) hostname() string {
	data, _ := sh.g.fs.readFile("/etc/hostname")
	return strings.TrimSpace(string(data))
}

// biHostname prints the host name.
func biHostname(sh *shell, args []string, in []byte, out, errw *sink) int {
	out.printf("%s\n", sh.hostname())
	return 0
}

// biWhoami prints the guest user.
func biWhoami(sh *shell, args []string, in []byte, out, errw *sink) int {
	out.printf("%s\n", sh.env["USER"])
	return 0
}

// biTest evaluates -e -f -d -s -n -z, = and != (with a leading ! to negate).
func biTest(sh *shell, args []string, in []byte, out, errw *sink) int {
	a := args[1:]
	if args[0] == "[" {
		if len(a) == 0 || a[len(a)-1] != "]" {
			errw.printf("[: missing ]\n")
			return 2
		}
		a = a[:len(a)-1]
	}
	neg := len(a) > 0 && a[0] == "!"
	if neg {
		a = a[1:]
	}
	ok := false
	switch {
	case len(a) == 1:
		ok = a[0] != ""
	case len(a) == 2 && a[0] == "-n":
		ok = a[1] != ""
	case len(a) == 2 && a[0] == "-z":
		ok = a[1] == ""
	case len(a) == 2 && (a[0] == "-e" || a[0] == "-f" || a[0] == "-d" || a[0] == "-s"):
		n, err := sh.g.fs.lookup(sh.abs(a[1]))
		ok = err == nil && (a[0] == "-e" || (a[0] == "-d") == n.dir) && (a[0] != "-s" || len(n.data) > 0)
	case len(a) == 3 && (a[1] == "=" || a[1] == "=="):
		ok = a[0] == a[2]
	case len(a) == 3 && a[1] == "!=":
		ok = a[0] != a[2]
	}
	if ok != neg {
		return 0
	}
	return 1
}

// biTouch creates empty files or updates their modification time.
func biTouch(sh *shell, args []string, in []byte, out, errw *sink) int {
	_, files := flags(args)
	code := 0
	for _, f := range files {
		if n, err := sh.g.fs.lookup(sh.abs(f)); err == nil {
			n.mtime = time.Now()
		} else if err := sh.g.fs.writeFile(sh.abs(f), nil, 0644, false, true); err != nil {
			errw.printf("touch: %s: %s\n", f, err)
			code = 1
		}
	}
	return code
}

// biChmod sets octal permissions.
func biChmod(sh *shell, args []string, in []byte, out, errw *sink) int {
	if len(args) < 3 {
		errw.printf("chmod: missing operand\n")
		return 1
	}
	mode, err := strconv.ParseUint(args[1], 8, 32)
	if err != nil {
		errw.printf("chmod: invalid mode '%s' (octal only)\n", args[1])
		return 1
	}
	code := 0
	for _, f := range args[2:] {
		n, err := sh.g.fs.lookup(sh.abs(f))
		if err != nil {
			errw.printf("chmod: %s: %s\n", f, err)
			code = 1
			continue
		}
		n.mode = uint32(mode) & 07777
	}
	return code
}

// biMv renames a file or directory (into a directory when the target is one).
func biMv(sh *shell, args []string, in []byte, out, errw *sink) int {
	return copyOrMove(sh, args, errw, true)
}

// biCp copies a regular file.
func biCp(sh *shell, args []string, in []byte, out, errw *sink) int {
	return copyOrMove(sh, args, errw, false)
}

// copyOrMove implements mv and cp for one source and one target.
func copyOrMove(sh *shell, args []string, errw *sink, move bool) int {
	_, ops := flags(args)
	if len(ops) != 2 {
		errw.printf("%s: need exactly one source and one target\n", args[0])
		return 1
	}
	src, dst := sh.abs(ops[0]), sh.abs(ops[1])
	if n, err := sh.g.fs.lookup(dst); err == nil && n.dir {
		dst = path.Join(dst, path.Base(src))
	}
	var err error
	if n, lerr := sh.g.fs.lookup(src); lerr != nil {
		err = lerr
	} else if move {
		err = sh.g.fs.move(src, dst, n.dir, true)
	} else if n.dir {
		err = &fsError{"notFile", src}
	} else if err = sh.g.fs.writeFile(dst, n.data, n.mode, true, false); err == nil {
		m, _ := sh.g.fs.lookup(dst)
		m.mode = n.mode
	}
	if err != nil {
		errw.printf("%s: %s: %s\n", args[0], ops[0], err)
		return 1
	}
	return 0
}

// biSh runs `sh -c SCRIPT [NAME ARGS...]`, `sh FILE [ARGS...]`, or a script on stdin.
func biSh(sh *shell, args []string, in []byte, out, errw *sink) int {
	sub := &shell{g: sh.g, p: sh.p, env: map[string]string{}, cwd: sh.cwd}
	for _, k := range sh.order {
		sub.setVar(k, sh.env[k])
	}
	var script string
	switch {
	case len(args) >= 3 && args[1] == "-c":
		script, sub.args = args[2], []string{"sh"}
		if len(args) > 3 {
			sub.args = args[3:] // $0 is the first argument after the script, as in sh
		}
	case len(args) == 2 && args[1] == "-c":
		errw.printf("sh: -c requires an argument\n")
		return 2
	case len(args) >= 2:
		data, err := sh.g.fs.readFile(sh.abs(args[1]))
		if err != nil {
			errw.printf("sh: can't open '%s': %s\n", args[1], err)
			return 127
		}
		script, sub.args = string(data), args[1:]
	default:
		script, sub.args, in = string(in), []string{"sh"}, nil
	}
	return sub.run(script, in, out, errw)
}
