package main

// guestfs.go: the per-VM in-memory file system and the GuestFileManager methods on it.

import (
	"crypto/rand"
	"encoding/hex"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// node is one file or directory of a guest file system.
type node struct {
	dir      bool
	data     []byte
	mode     uint32 // permission bits only (07777)
	uid, gid int32
	mtime    time.Time
	children map[string]*node
}

// fsError is a file system failure; kind picks the vSphere fault it becomes.
type fsError struct {
	kind string // notFound, exists, notDir, notFile, notEmpty, denied
	path string
}

// Error renders the failure the way a POSIX tool would name it.
func (e *fsError) Error() string {
	msgs := map[string]string{"notFound": "No such file or directory", "exists": "File exists",
		"notDir": "Not a directory", "notFile": "Is a directory", "notEmpty": "Directory not empty",
		"denied": "Permission denied"}
	return msgs[e.kind]
}

// fault maps a file system error to the vSphere fault real guest operations answer.
func (e *fsError) fault() types.BaseMethodFault {
	ff := types.FileFault{File: e.path}
	switch e.kind {
	case "notFound":
		return &types.FileNotFound{FileFault: ff}
	case "exists":
		return &types.FileAlreadyExists{FileFault: ff}
	case "notDir":
		return &types.NotADirectory{FileFault: ff}
	case "notFile":
		return &types.NotAFile{FileFault: ff}
	case "notEmpty":
		return &types.DirectoryNotEmpty{FileFault: ff}
	}
	return &types.GuestPermissionDenied{}
}

// guestFS is the file system of one VM, rooted at "/".
type guestFS struct{ root *node }

// newGuestFS builds the initial tree: /, /tmp, /root, /etc/hostname (the VM name).
func newGuestFS(hostname string) *guestFS {
	now := time.Now()
	fs := &guestFS{root: &node{dir: true, mode: 0755, mtime: now, children: map[string]*node{}}}
	_ = fs.mkdir("/tmp", false, 01777)
	_ = fs.mkdir("/root", false, 0700)
	_ = fs.mkdir("/etc", false, 0755)
	_ = fs.writeFile("/etc/hostname", []byte(hostname+"\n"), 0644, true, false)
	return fs
}

// split cleans an absolute path into its components ("/" gives none).
func split(p string) []string {
	p = path.Clean("/" + p)
	if p == "/" {
		return nil
	}
	return strings.Split(p[1:], "/")
}

// lookup finds the node at p.
func (fs *guestFS) lookup(p string) (*node, error) {
	n := fs.root
	for _, c := range split(p) {
		if !n.dir {
			return nil, &fsError{"notDir", p}
		}
		next, ok := n.children[c]
		if !ok {
			return nil, &fsError{"notFound", p}
		}
		n = next
	}
	return n, nil
}

// parent finds the directory that holds p, and p's last component.
func (fs *guestFS) parent(p string) (*node, string, error) {
	parts := split(p)
	if len(parts) == 0 {
		return nil, "", &fsError{"denied", p}
	}
	dir, err := fs.lookup("/" + strings.Join(parts[:len(parts)-1], "/"))
	if err != nil {
		return nil, "", &fsError{"notFound", p}
	}
	if !dir.dir {
		return nil, "", &fsError{"notDir", p}
	}
	return dir, parts[len(parts)-1], nil
}

// mkdir creates a directory, with its parents when parents is set (then an existing one is fine).
func (fs *guestFS) mkdir(p string, parents bool, mode uint32) error {
	if parents {
		n := fs.root
		for _, c := range split(p) {
			next, ok := n.children[c]
			if !ok {
				next = &node{dir: true, mode: mode, mtime: time.Now(), children: map[string]*node{}}
				n.children[c] = next
			} else if !next.dir {
				return &fsError{"notDir", p}
			}
			n = next
		}
		return nil
	}
	dir, name, err := fs.parent(p)
	if err != nil {
		return err
	}
	if _, ok := dir.children[name]; ok {
		return &fsError{"exists", p}
	}
	dir.children[name] = &node{dir: true, mode: mode, mtime: time.Now(), children: map[string]*node{}}
	dir.mtime = time.Now()
	return nil
}

// writeFile creates or replaces (overwrite) or extends (appendTo) a regular file.
func (fs *guestFS) writeFile(p string, data []byte, mode uint32, overwrite, appendTo bool) error {
	dir, name, err := fs.parent(p)
	if err != nil {
		return err
	}
	old, ok := dir.children[name]
	switch {
	case ok && old.dir:
		return &fsError{"notFile", p}
	case ok && appendTo:
		old.data = append(old.data, data...)
		old.mtime = time.Now()
		return nil
	case ok && !overwrite:
		return &fsError{"exists", p}
	case ok:
		mode = old.mode
	}
	dir.children[name] = &node{data: append([]byte(nil), data...), mode: mode, mtime: time.Now()}
	dir.mtime = time.Now()
	return nil
}

// readFile returns a regular file's content.
func (fs *guestFS) readFile(p string) ([]byte, error) {
	n, err := fs.lookup(p)
	if err != nil {
		return nil, err
	}
	if n.dir {
		return nil, &fsError{"notFile", p}
	}
	return n.data, nil
}

// remove deletes a file (wantDir false) or a directory (wantDir true, recursive or empty).
func (fs *guestFS) remove(p string, wantDir, recursive bool) error {
	dir, name, err := fs.parent(p)
	if err != nil {
		return err
	}
	n, ok := dir.children[name]
	switch {
	case !ok:
		return &fsError{"notFound", p}
	case wantDir && !n.dir:
		return &fsError{"notDir", p}
	case !wantDir && n.dir:
		return &fsError{"notFile", p}
	case n.dir && len(n.children) > 0 && !recursive:
		return &fsError{"notEmpty", p}
	}
	delete(dir.children, name)
	dir.mtime = time.Now()
	return nil
}

// move renames src to dst; wantDir says which kind src must be.
func (fs *guestFS) move(src, dst string, wantDir, overwrite bool) error {
	n, err := fs.lookup(src)
	if err != nil {
		return err
	}
	sdir, sname, err := fs.parent(src)
	if err != nil {
		return err
	}
	if wantDir != n.dir {
		if wantDir {
			return &fsError{"notDir", src}
		}
		return &fsError{"notFile", src}
	}
	if strings.HasPrefix(path.Clean("/"+dst)+"/", path.Clean("/"+src)+"/") {
		return &fsError{"denied", dst}
	}
	ddir, dname, err := fs.parent(dst)
	if err != nil {
		return err
	}
	if old, ok := ddir.children[dname]; ok && (!overwrite || old.dir || n.dir) {
		return &fsError{"exists", dst}
	}
	delete(sdir.children, sname)
	ddir.children[dname] = n
	sdir.mtime, ddir.mtime = time.Now(), time.Now()
	return nil
}

// tempName creates a uniquely named file or directory under dir.
func (fs *guestFS) tempName(dir, prefix, suffix string, isDir bool) (string, error) {
	if dir == "" {
		dir = "/tmp"
	}
	d, err := fs.lookup(dir)
	if err != nil {
		return "", err
	}
	if !d.dir {
		return "", &fsError{"notDir", dir}
	}
	for {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		p := path.Join(dir, prefix+hex.EncodeToString(b)+suffix)
		if _, taken := d.children[path.Base(p)]; taken {
			continue
		}
		if isDir {
			return p, fs.mkdir(p, false, 0700)
		}
		return p, fs.writeFile(p, nil, 0600, false, false)
	}
}

// attributes describes a node as real guest operations do for a POSIX guest.
func attributes(n *node) *types.GuestPosixFileAttributes {
	mt, uid, gid := n.mtime, n.uid, n.gid
	return &types.GuestPosixFileAttributes{
		GuestFileAttributes: types.GuestFileAttributes{ModificationTime: &mt, AccessTime: &mt},
		OwnerId:             &uid, GroupId: &gid, Permissions: int64(n.mode),
	}
}

// applyAttributes sets permissions, owner and modification time from a request's attributes.
func applyAttributes(n *node, a types.BaseGuestFileAttributes) {
	if a == nil {
		return
	}
	if t := a.GetGuestFileAttributes().ModificationTime; t != nil {
		n.mtime = *t
	}
	if px, ok := a.(*types.GuestPosixFileAttributes); ok {
		if px.Permissions != 0 {
			n.mode = uint32(px.Permissions) & 07777
		}
		if px.OwnerId != nil {
			n.uid = *px.OwnerId
		}
		if px.GroupId != nil {
			n.gid = *px.GroupId
		}
	}
}

// fileInfo is one ListFilesInGuest entry.
func fileInfo(p string, n *node) types.GuestFileInfo {
	kind, size := "file", int64(len(n.data))
	if n.dir {
		kind, size = "directory", 4096
	}
	return types.GuestFileInfo{Path: p, Type: kind, Size: size, Attributes: attributes(n)}
}

// fileOp runs f on the VM's file system after the guest checks; a failure becomes a fault.
func fileOp(ctx *simulator.Context, vm types.ManagedObjectReference, auth types.BaseGuestAuthentication,
	f func(g *guestVM) error) *soap.Fault {
	return guestOp(ctx, vm, auth, func(g *guestVM) *soap.Fault {
		if err := f(g); err != nil {
			if fe, ok := err.(*fsError); ok {
				return simulator.Fault(fe.path+": "+fe.Error(), fe.fault())
			}
			return simulator.Fault(err.Error(), &types.GuestOperationsFault{})
		}
		return nil
	})
}

// fileManager replaces the simulator's GuestFileManager with in-memory operations.
type fileManager struct {
	*simulator.GuestFileManager
}

// InitiateFileTransferToGuest checks the target and hands out a single-use PUT URL.
func (m *fileManager) InitiateFileTransferToGuest(ctx *simulator.Context, req *types.InitiateFileTransferToGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferToGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		if n, err := g.fs.lookup(req.GuestFilePath); err == nil {
			if n.dir {
				return &fsError{"notFile", req.GuestFilePath}
			}
			if !req.Overwrite {
				return &fsError{"exists", req.GuestFilePath}
			}
		} else if _, _, err := g.fs.parent(req.GuestFilePath); err != nil {
			return err
		}
		t := &transfer{vm: req.Vm, path: req.GuestFilePath, upload: true, size: req.FileSize,
			attrs: req.FileAttributes, overwrite: req.Overwrite}
		body.Res = &types.InitiateFileTransferToGuestResponse{Returnval: state.newTransfer(t)}
		return nil
	})
	return body
}

// InitiateFileTransferFromGuest describes the file and hands out a single-use GET URL.
func (m *fileManager) InitiateFileTransferFromGuest(ctx *simulator.Context, req *types.InitiateFileTransferFromGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferFromGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		n, err := g.fs.lookup(req.GuestFilePath)
		if err != nil {
			return err
		}
		if n.dir {
			return &fsError{"notFile", req.GuestFilePath}
		}
		url := state.newTransfer(&transfer{vm: req.Vm, path: req.GuestFilePath})
		body.Res = &types.InitiateFileTransferFromGuestResponse{Returnval: types.FileTransferInformation{
			Attributes: attributes(n), Size: int64(len(n.data)), Url: url}}
		return nil
	})
	return body
}

// MakeDirectoryInGuest creates a directory (and its parents when asked).
func (m *fileManager) MakeDirectoryInGuest(ctx *simulator.Context, req *types.MakeDirectoryInGuest) soap.HasFault {
	body := new(methods.MakeDirectoryInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		if n, err := g.fs.lookup(req.DirectoryPath); err == nil && req.CreateParentDirectories && n.dir {
			return &fsError{"exists", req.DirectoryPath}
		}
		return g.fs.mkdir(req.DirectoryPath, req.CreateParentDirectories, 0755)
	})
	if body.Fault_ == nil {
		body.Res = new(types.MakeDirectoryInGuestResponse)
	}
	return body
}

// DeleteFileInGuest removes a regular file.
func (m *fileManager) DeleteFileInGuest(ctx *simulator.Context, req *types.DeleteFileInGuest) soap.HasFault {
	body := new(methods.DeleteFileInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		return g.fs.remove(req.FilePath, false, false)
	})
	if body.Fault_ == nil {
		body.Res = new(types.DeleteFileInGuestResponse)
	}
	return body
}

// DeleteDirectoryInGuest removes a directory, with its content when Recursive.
func (m *fileManager) DeleteDirectoryInGuest(ctx *simulator.Context, req *types.DeleteDirectoryInGuest) soap.HasFault {
	body := new(methods.DeleteDirectoryInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		return g.fs.remove(req.DirectoryPath, true, req.Recursive)
	})
	if body.Fault_ == nil {
		body.Res = new(types.DeleteDirectoryInGuestResponse)
	}
	return body
}

// CreateTemporaryFileInGuest makes an empty uniquely named file (in /tmp by default).
func (m *fileManager) CreateTemporaryFileInGuest(ctx *simulator.Context, req *types.CreateTemporaryFileInGuest) soap.HasFault {
	body := new(methods.CreateTemporaryFileInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		p, err := g.fs.tempName(req.DirectoryPath, req.Prefix, req.Suffix, false)
		body.Res = &types.CreateTemporaryFileInGuestResponse{Returnval: p}
		return err
	})
	return body
}

// CreateTemporaryDirectoryInGuest makes an empty uniquely named directory (in /tmp by default).
func (m *fileManager) CreateTemporaryDirectoryInGuest(ctx *simulator.Context, req *types.CreateTemporaryDirectoryInGuest) soap.HasFault {
	body := new(methods.CreateTemporaryDirectoryInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		p, err := g.fs.tempName(req.DirectoryPath, req.Prefix, req.Suffix, true)
		body.Res = &types.CreateTemporaryDirectoryInGuestResponse{Returnval: p}
		return err
	})
	return body
}

// ListFilesInGuest lists a directory (or one file), filtered by MatchPattern and paged by Index/MaxResults.
func (m *fileManager) ListFilesInGuest(ctx *simulator.Context, req *types.ListFilesInGuest) soap.HasFault {
	body := new(methods.ListFilesInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		n, err := g.fs.lookup(req.FilePath)
		if err != nil {
			return err
		}
		var all []types.GuestFileInfo
		if !n.dir {
			all = append(all, fileInfo(path.Base(req.FilePath), n))
		} else {
			re, err := regexp.Compile(req.MatchPattern)
			if err != nil {
				return err
			}
			names := []string{".", ".."}
			for name := range n.children {
				names = append(names, name)
			}
			sort.Strings(names[2:])
			for _, name := range names {
				c := n.children[name]
				if c == nil {
					c = n // "." and ".." describe the directory itself
				}
				if re.MatchString(name) {
					all = append(all, fileInfo(name, c))
				}
			}
		}
		res := types.GuestListFileInfo{}
		if int(req.Index) < len(all) {
			all = all[req.Index:]
			if req.MaxResults > 0 && int(req.MaxResults) < len(all) {
				res.Remaining = int32(len(all)) - req.MaxResults
				all = all[:req.MaxResults]
			}
			res.Files = all
		}
		body.Res = &types.ListFilesInGuestResponse{Returnval: res}
		return nil
	})
	return body
}

// MoveFileInGuest renames a regular file.
func (m *fileManager) MoveFileInGuest(ctx *simulator.Context, req *types.MoveFileInGuest) soap.HasFault {
	body := new(methods.MoveFileInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		return g.fs.move(req.SrcFilePath, req.DstFilePath, false, req.Overwrite)
	})
	if body.Fault_ == nil {
		body.Res = new(types.MoveFileInGuestResponse)
	}
	return body
}

// MoveDirectoryInGuest renames a directory (the destination must not exist).
func (m *fileManager) MoveDirectoryInGuest(ctx *simulator.Context, req *types.MoveDirectoryInGuest) soap.HasFault {
	body := new(methods.MoveDirectoryInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		return g.fs.move(req.SrcDirectoryPath, req.DstDirectoryPath, true, false)
	})
	if body.Fault_ == nil {
		body.Res = new(types.MoveDirectoryInGuestResponse)
	}
	return body
}

// ChangeFileAttributesInGuest sets permissions, owner and modification time.
func (m *fileManager) ChangeFileAttributesInGuest(ctx *simulator.Context, req *types.ChangeFileAttributesInGuest) soap.HasFault {
	body := new(methods.ChangeFileAttributesInGuestBody)
	body.Fault_ = fileOp(ctx, req.Vm, req.Auth, func(g *guestVM) error {
		n, err := g.fs.lookup(req.GuestFilePath)
		if err == nil {
			applyAttributes(n, req.FileAttributes)
		}
		return err
	})
	if body.Fault_ == nil {
		body.Res = new(types.ChangeFileAttributesInGuestResponse)
	}
	return body
}
